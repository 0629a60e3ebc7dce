"""A worker with step-level batching: concurrent masked jobs share engine steps and match the unbatched worker.

The batching worker serves the test model under the name "batch" (its own queues), beside the session's
prefork worker serving it as "flux", so both run the same template, masks and seeds.
"""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from editing.catalog import parse_models
from editing.models import CacheWarmup
from editor_site import redis_keys
from editor_site.stack import worker_command
from tests.conftest import PHOTOS, png_bytes, running_worker
from tests.test_e2e_worker import poll_until_final

STEPS = 30
MASKS = [(40, 120, 60, 180), (200, 320, 250, 380), (100, 180, 400, 560), (250, 370, 60, 200)]


@pytest.fixture(scope="module")
def batching_worker(worker_env, test_model_path, tmp_path_factory):
    env = {
        **worker_env,
        "EDITOR_MODELS": f"flux=flux:{test_model_path},batch=flux:{test_model_path}",
        "EDITOR_WORKER_MODELS": "batch",
        "EDITOR_ENGINE_MAX_BATCH": "4",
    }
    from editing.routing import model_queues

    queues = model_queues("batch")
    command = worker_command(queues, name=f"batch-{uuid.uuid4().hex[:8]}", batch=4)
    log_path = tmp_path_factory.mktemp("batching-worker") / "worker.log"
    with running_worker(command, env, queues, log_path):
        yield command[command.index("-n") + 1].split("@")[0]


def stroke(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((400, 600), dtype=np.uint8)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 255
    return mask


def result_pixels(client, body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b"".join(client.get(body["result_url"]).streaming_content))))[..., :3]


def run_jobs(client, template_id: int, model: str) -> list[dict]:
    submitted = []
    for index, (r0, r1, c0, c1) in enumerate(MASKS):
        response = client.post(
            "/api/jobs/",
            {"template": template_id, "mask": SimpleUploadedFile("m.png", png_bytes(stroke((r0, r1), (c0, c1)))),
             "prompt": f"object number {index}", "steps": STEPS, "model": model},
            format="multipart",
        )
        assert response.status_code == 201, response.content
        submitted.append(response.json())
    return [poll_until_final(client, job["id"], timeout_s=240)[0] for job in submitted]


def test_batched_jobs_share_steps_and_match_unbatched_results(
    api_client_for, celery_worker_process, batching_worker, settings, test_model_path
):
    settings.EDITOR_MODELS = parse_models(f"flux=flux:{test_model_path},batch=flux:{test_model_path}")
    settings.EDITOR_DEFAULT_STEPS = STEPS
    settings.EDITOR_WARMUP_ON_CREATE = False
    client = api_client_for("batcher")
    template = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("c.png", (PHOTOS / "coffee.png").read_bytes())},
        format="multipart",
    ).json()
    for model in ("batch", "flux"):
        assert client.post(f"/api/templates/{template['id']}/warm/", {"steps": STEPS, "model": model}).status_code == 202
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            warmups = {w.model: w.status for w in CacheWarmup.objects.filter(template_id=template["id"])}
            if warmups.get(model) in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert warmups.get(model) == "succeeded", warmups

    batched = run_jobs(client, template["id"], "batch")
    unbatched = run_jobs(client, template["id"], "flux")

    for fast, reference in zip(batched, unbatched):
        assert fast["status"] == reference["status"] == "succeeded", (fast["error"], reference["error"])
        assert fast["cache_outcome"] == reference["cache_outcome"] == "hit"
        difference = np.abs(result_pixels(client, fast).astype(int) - result_pixels(client, reference).astype(int))
        # Batched and unbatched latents agree within 1e-4; after decoding that is at most a rounding step.
        assert difference.max() <= 2, difference.max()

    hostname = next(
        key.decode().rsplit(":", 1)[-1] for key in redis_keys.client().scan_iter(
            match=redis_keys.worker_metrics_key(f"{batching_worker}@*")
        )
    )
    metrics = redis_keys.client().get(redis_keys.worker_metrics_key(hostname)).decode()
    max_batch = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("editor_engine_batch_size_max{")
    )
    assert max_batch >= 2, metrics
    assert "editor_engine_step_overhead_seconds_median" in metrics



def test_step_callback_enforces_the_soft_time_limit():
    from celery.exceptions import SoftTimeLimitExceeded

    from workers.execution import JobTimedOut, StepReporter

    # The threads pool has no Celery time limits, so the step callback, which the engine calls after
    # every step of the request, raises once the deadline has passed; an exception there ends only that
    # request (tests/test_engine.py), and the job fails with the time-limit message.
    reporter = StepReporter(uuid.uuid4(), deadline=time.monotonic() - 1.0)
    with pytest.raises(JobTimedOut):
        reporter(3, 10)
    assert issubclass(JobTimedOut, SoftTimeLimitExceeded)
