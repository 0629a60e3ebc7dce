"""End to end: API -> Redis queue -> real Celery worker process -> stored result."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from editing import imaging
from tests.conftest import PHOTOS, png_bytes, stroke_mask

pytestmark = pytest.mark.django_db(transaction=True)

POLL_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def no_automatic_warmup(settings):
    """Most tests here exercise the full path; the cache tests turn warm-ups back on."""
    settings.EDITOR_WARMUP_ON_CREATE = False


def poll_until_final(client, job_id: str, timeout_s: float = POLL_TIMEOUT_S) -> tuple[dict, list[float]]:
    deadline = time.monotonic() + timeout_s
    progress_seen: list[float] = []
    while time.monotonic() < deadline:
        body = client.get(f"/api/jobs/{job_id}/").json()
        progress_seen.append(body["progress"])
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body, progress_seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s; last status {body['status']}")


def upload_template(client, path) -> dict:
    response = client.post(
        "/api/templates/", {"image": SimpleUploadedFile(path.name, path.read_bytes())}, format="multipart"
    )
    assert response.status_code == 201, response.content
    return response.json()


def submit(client, template_id: int, mask: np.ndarray, **fields) -> dict:
    payload = {
        "template": template_id,
        "mask": SimpleUploadedFile("mask.png", png_bytes(mask)),
        "prompt": "a ceramic cup with a blue glaze",
        "steps": 4,
    }
    payload.update(fields)
    response = client.post("/api/jobs/", payload, format="multipart")
    assert response.status_code == 201, response.content
    return response.json()


def test_coffee_edit_round_trip(api_client_for, celery_worker_process, settings):
    client = api_client_for("alice")
    template = upload_template(client, PHOTOS / "coffee.png")
    mask = stroke_mask(600, 400)
    job = submit(client, template["id"], mask)

    body, progress = poll_until_final(client, job["id"])

    assert body["status"] == "succeeded", body["error"]
    assert body["progress"] == 1.0
    assert set(body["timings"]) >= {"load", "preprocess", "denoise", "decode", "store"}
    response = client.get(body["result_url"])
    assert response.status_code == 200
    result = np.asarray(Image.open(io.BytesIO(b"".join(response.streaming_content))).convert("RGB"))
    original = imaging.read_template(
        (PHOTOS / "coffee.png").read_bytes(), max_pixels=10**8, max_bytes=10**8
    )
    assert result.shape == original.shape
    outside = ~imaging.dilate(mask > 127, 16)
    assert np.array_equal(result[outside], original[outside])
    assert not np.array_equal(result[mask > 127], original[mask > 127])
    assert client.get(body["result_url"]).status_code == 200
    assert api_client_for("bob").get(body["result_url"]).status_code == 404


def test_odd_size_grayscale_template(api_client_for, celery_worker_process):
    client = api_client_for("alice")
    template = upload_template(client, PHOTOS / "chelsea.png")
    body, _ = poll_until_final(client, submit(client, template["id"], stroke_mask(451, 300))["id"])
    assert body["status"] == "succeeded", body["error"]
    result = Image.open(io.BytesIO(b"".join(client.get(body["result_url"]).streaming_content)))
    assert result.size == (451, 300)


def test_cancel_while_running_stops_job(api_client_for, celery_worker_process):
    client = api_client_for("alice")
    template = upload_template(client, PHOTOS / "astronaut.png")
    job = submit(client, template["id"], stroke_mask(512, 512), steps=100)
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while client.get(f"/api/jobs/{job['id']}/").json()["status"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.1)
    assert client.post(f"/api/jobs/{job['id']}/cancel/").status_code == 200
    body, _ = poll_until_final(client, job["id"])
    assert body["status"] == "cancelled"
    assert body["result_url"] is None


def wait_for_warmup(client, template_id: int, timeout_s: float = POLL_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cache = client.get(f"/api/templates/{template_id}/").json()["cache"]
        if cache and cache["status"] in ("succeeded", "failed"):
            return cache
        time.sleep(0.2)
    raise AssertionError(f"warm-up of template {template_id} did not finish within {timeout_s} s")


def test_warmed_template_serves_masked_edit(api_client_for, celery_worker_process, settings, django_user_model):
    settings.EDITOR_WARMUP_ON_CREATE = True
    settings.EDITOR_DEFAULT_STEPS = 4
    client = api_client_for("alice")
    template = upload_template(client, PHOTOS / "coffee.png")
    cache = wait_for_warmup(client, template["id"])
    assert cache["status"] == "succeeded", cache["error"]
    assert cache["cache_bytes"] > 0
    assert (cache["steps"], cache["seed"]) == (4, 0)

    mask = stroke_mask(600, 400)
    hit = submit(client, template["id"], mask, steps=4)
    body, _ = poll_until_final(client, hit["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["cache_outcome"] == "hit"
    assert body["cache_used"] is True
    assert 0 < body["flop_fraction"] < 0.6
    result = np.asarray(Image.open(io.BytesIO(b"".join(client.get(body["result_url"]).streaming_content))))
    original = imaging.read_template((PHOTOS / "coffee.png").read_bytes(), max_pixels=10**8, max_bytes=10**8)
    outside = ~imaging.dilate(mask > 127, 16)
    assert np.array_equal(result[..., :3][outside], original[outside])

    client_for_staff = Client()
    client_for_staff.force_login(django_user_model.objects.create_user("ops", is_staff=True))
    metrics = client_for_staff.get("/metrics").content.decode()
    assert 'editor_cache_hits_total{worker="' in metrics

    other_seed = submit(client, template["id"], mask, steps=4, seed=7)
    body, _ = poll_until_final(client, other_seed["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["cache_outcome"] == "miss_full"
    assert body["cache_used"] is False

    dropped = client.delete(f"/api/templates/{template['id']}/cache/")
    assert dropped.status_code == 200
    assert dropped.json()["dropped"] >= 1
    after_drop = submit(client, template["id"], mask, steps=4)
    body, _ = poll_until_final(client, after_drop["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["cache_outcome"] != "hit"


def test_warm_endpoint_queues_warmup(api_client_for, celery_worker_process):
    client = api_client_for("alice")
    template = upload_template(client, PHOTOS / "chelsea.png")
    response = client.post(f"/api/templates/{template['id']}/warm/", {"steps": 3, "seed": 5}, format="json")
    assert response.status_code == 202, response.content
    assert (response.json()["steps"], response.json()["seed"]) == (3, 5)
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        warmups = [w for w in [client.get(f"/api/templates/{template['id']}/").json()["cache"]] if w]
        if warmups and warmups[0]["steps"] == 3 and warmups[0]["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, "the requested warm-up never finished"
        time.sleep(0.2)
    first = warmups[0]
    assert "warmup" in first["timings"]

    # The same warm-up again finds the entry in the worker's cache and does not recompute it.
    again = client.post(f"/api/templates/{template['id']}/warm/", {"steps": 3, "seed": 5}, format="json")
    assert again.status_code == 202, again.content
    cache = wait_for_warmup(client, template["id"])
    assert cache["id"] == again.json()["id"]
    assert cache["status"] == "succeeded", cache["error"]
    assert cache["cache_key"] == first["cache_key"]
    assert cache["cache_bytes"] == first["cache_bytes"]
    assert "warmup" not in cache["timings"]
    assert "cache_lookup" in cache["timings"]

    job = submit(client, template["id"], stroke_mask(451, 300), steps=3, seed=5)
    body, _ = poll_until_final(client, job["id"])
    assert body["cache_outcome"] == "hit"
