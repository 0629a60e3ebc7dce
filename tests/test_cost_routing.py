"""The cost routing policy: predictions, choices, backlog, re-routing from gone workers, and a real worker."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from editing import cost_routing, reconciler, services
from editing.models import EditJob, JobStatus
from editor_site import redis_keys
from tests.conftest import PHOTOS, png_bytes, stroke_mask

pytestmark = pytest.mark.django_db

COST = {"step_intercept_s": 0.01, "step_s_per_token": 0.001, "load_latency_s": 0.5, "load_s_per_mib": 0.01,
        "text_tokens": 128}


def shape(**changes) -> cost_routing.JobShape:
    values = dict(model="flux", template_hash="abc", width=512, height=512, mask_ratio=0.1, steps=10, seed=0,
                  guidance=30.0)
    values.update(changes)
    return cost_routing.JobShape(**values)


def load(*, busy_in: float = 0.0, memory: list[str] = (), disk: list[str] = (), now: float = 1000.0) -> dict:
    return {"busy_until": now + busy_in if busy_in else 0.0, "costs": {"flux": COST},
            "resident": {"memory": list(memory), "disk": list(disk)}}


def test_cached_template_costs_only_its_masked_tokens():
    job = shape()
    wait, run_cold, tier_cold = cost_routing.predict(job, load(), 0.0, now=1000.0)
    _, run_hot, tier_hot = cost_routing.predict(job, load(memory=[job.residency_token]), 0.0, now=1000.0)
    _, run_disk, tier_disk = cost_routing.predict(job, load(disk=[job.residency_token]), 0.0, now=1000.0)
    # 1024 image tokens at 512x512 with 16-pixel tokens.
    assert run_cold == pytest.approx(10 * (0.01 + 0.001 * (128 + 1024)))
    assert run_hot == pytest.approx(10 * (0.01 + 0.001 * (128 + 102.4)))
    assert run_disk == pytest.approx(run_hot + 0.5)
    assert (tier_cold, tier_hot, tier_disk) == ("none", "memory", "disk")
    assert wait == 0.0


def test_large_mask_runs_in_full():
    job = shape(mask_ratio=0.95)
    _, run, tier = cost_routing.predict(job, load(memory=[job.residency_token]), 0.0, now=1000.0)
    assert tier == "none"
    assert run == pytest.approx(10 * (0.01 + 0.001 * (128 + 1024)))


def test_wait_counts_running_job_and_backlog():
    wait, _, _ = cost_routing.predict(shape(), load(busy_in=3.0), 2.5, now=1000.0)
    assert wait == pytest.approx(5.5)


def test_free_batch_slot_skips_wait():
    record = {**load(busy_in=5.0), "slots": 4, "running": 2, "running_tokens": 460.0}
    wait, run, _ = cost_routing.predict(shape(), record, 3.0, now=1000.0, backlog_jobs=1)
    assert wait == 0.0
    # Its steps also carry the 460 tokens of the two running jobs.
    assert run == pytest.approx(10 * (0.01 + 0.001 * (128 + 1024 + 460)))
    # With every slot taken by running and routed jobs it waits like a one-job worker.
    wait, run, _ = cost_routing.predict(shape(), record, 3.0, now=1000.0, backlog_jobs=2)
    assert wait == pytest.approx(8.0)
    assert run == pytest.approx(10 * (0.01 + 0.001 * (128 + 1024)))


def test_tokens_follow_worker_working_size():
    record = {**load(), "max_work_pixels": 256 * 256}
    _, run, _ = cost_routing.predict(shape(), record, 0.0, now=1000.0)
    # The worker scales 512x512 down to 256x256: 16 x 16 tokens of 16 pixels.
    assert run == pytest.approx(10 * (0.01 + 0.001 * (128 + 256)))


def test_worker_publishes_working_size(monkeypatch):
    from workers import worker_state

    monkeypatch.setenv("EDITOR_MAX_WORK_PIXELS", "65536")
    assert worker_state.snapshot()["max_work_pixels"] == 65536
    monkeypatch.delenv("EDITOR_MAX_WORK_PIXELS")
    assert worker_state.snapshot()["max_work_pixels"] == cost_routing.DEFAULT_MAX_WORK_PIXELS


def test_worker_without_cost_skipped():
    assert cost_routing.predict(shape(model="other"), load(), 0.0, now=1000.0) is None


def test_direct_queue_names_round_trip():
    queue = redis_keys.direct_queue("w1@host")
    assert queue == "edit.direct.w1@host"
    assert cost_routing.hostname_of_direct_queue(queue) == "w1@host"
    assert cost_routing.hostname_of_direct_queue("edit.flux.m10") is None


@pytest.fixture
def fleet_records(redis_url, settings):
    """Write heartbeats and load records as workers do; remove them afterwards.

    The router re-reads them on every decision here, so each record a test writes takes effect at once.
    """
    settings.EDITOR_ROUTING_REFRESH_S = 0
    cost_routing.forget_fleet_view()
    client = redis_keys.client()

    def clear() -> None:
        for pattern in ("editor:worker:*", "editor:load:*", "editor:backlog:*"):
            for key in client.scan_iter(match=redis_keys.key_prefix() + pattern):
                client.delete(key)

    def write(
        hostname: str, record: dict, models: tuple[str, ...] = ("flux",), started_at: float | None = None
    ) -> None:
        heartbeat = {"hostname": hostname, "models": list(models), "queues": [], "at": time.time()}
        if started_at is not None:
            heartbeat["started_at"] = started_at
        client.set(redis_keys.worker_state_key(hostname), json.dumps(heartbeat), ex=30)
        client.set(redis_keys.worker_load_key(hostname), json.dumps(record), ex=30)

    clear()
    yield write
    clear()


def test_choose_prefers_idle_worker_then_cache_affinity(fleet_records):
    job = shape()
    now = time.time()
    fleet_records("busy@h", load(busy_in=60.0, memory=[job.residency_token], now=now))
    fleet_records("idle@h", load(now=now))
    assert cost_routing.choose(job).hostname == "idle@h"

    fleet_records("busy@h", load(busy_in=0.5, memory=[job.residency_token], now=now))
    chosen = cost_routing.choose(job)
    # Half a second of waiting beats computing the 922 unmasked tokens on a cold worker.
    assert (chosen.hostname, chosen.cache) == ("busy@h", "memory")


def cache_tier_on(job: cost_routing.JobShape, hostname: str) -> str:
    return next(candidate.cache for candidate in cost_routing.candidates(job) if candidate.hostname == hostname)


def test_restarted_worker_loses_memory_residency(fleet_records):
    job = shape()
    on_disk = shape(seed=1)
    now = time.time()
    record = {**load(memory=[job.residency_token], disk=[on_disk.residency_token], now=now), "at": now - 5}

    fleet_records("w@h", record, started_at=now - 60)
    assert cache_tier_on(job, "w@h") == "memory"
    assert cache_tier_on(on_disk, "w@h") == "disk"

    # The heartbeat now comes from a process that started after the load record was written.
    fleet_records("w@h", record, started_at=now - 1)
    assert cache_tier_on(job, "w@h") == "none"
    assert cache_tier_on(on_disk, "w@h") == "disk"

    # The new process has published its own record since.
    fleet_records("w@h", {**record, "at": now}, started_at=now - 1)
    assert cache_tier_on(job, "w@h") == "memory"


def test_unfitted_worker_gets_median_fit(fleet_records):
    job = shape()
    now = time.time()
    slow = {**COST, "step_intercept_s": 0.03}
    fleet_records("a@h", {**load(busy_in=60.0, now=now), "costs": {"flux": COST}})
    fleet_records("b@h", {**load(busy_in=60.0, now=now), "costs": {"flux": slow}})
    # c has warmed the template but has run no job since it started, so it has published no fit yet.
    fleet_records("c@h", {**load(memory=[job.residency_token], now=now), "costs": {}})
    found = {candidate.hostname: candidate for candidate in cost_routing.candidates(job)}
    assert set(found) == {"a@h", "b@h", "c@h"}
    assert found["c@h"].run_s == pytest.approx(10 * (0.02 + 0.001 * (128 + 102.4)))
    assert cost_routing.choose(job).hostname == "c@h"

    # With no fit anywhere there is nothing to predict from, and the caller uses the bucket queues.
    for hostname in ("a@h", "b@h"):
        fleet_records(hostname, {**load(now=now), "costs": {}})
    assert cost_routing.choose(job) is None


def test_choose_counts_backlog_and_returns_none_without_workers(fleet_records):
    assert cost_routing.choose(shape()) is None
    fleet_records("a@h", load())
    fleet_records("b@h", load())
    first = cost_routing.choose(shape())
    cost_routing.add_to_backlog(first, "job-1")
    second = cost_routing.choose(shape())
    assert second.hostname != first.hostname


def test_burst_between_reads_spreads_over_workers(fleet_records, settings, monkeypatch):
    fleet_records("a@h", load())
    fleet_records("b@h", load())
    settings.EDITOR_ROUTING_REFRESH_S = 60
    reads = []
    original = cost_routing.read_fleet
    monkeypatch.setattr(cost_routing, "read_fleet", lambda: reads.append(1) or original())

    chosen = []
    for index in range(4):
        candidate = cost_routing.choose(shape())
        cost_routing.add_to_backlog(candidate, f"burst-{index}")
        chosen.append(candidate.hostname)

    assert len(reads) == 1
    # The backlog this process adds between reads counts at once, so the jobs alternate.
    assert sorted(chosen) == ["a@h", "a@h", "b@h", "b@h"]
    cost_routing.forget_fleet_view()


@pytest.fixture
def alice(api_client_for):
    return api_client_for("alice")


def submit(client, settings, capture=None):
    """Upload coffee.png and submit a job; with `capture` (django_capture_on_commit_callbacks) it is sent too."""
    if capture is not None:
        with capture(execute=True):
            return submit(client, settings)
    settings.EDITOR_WARMUP_ON_CREATE = False
    template = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("c.png", (PHOTOS / "coffee.png").read_bytes())},
        format="multipart",
    ).json()
    response = client.post(
        "/api/jobs/",
        {"template": template["id"], "mask": SimpleUploadedFile("m.png", png_bytes(stroke_mask(600, 400))),
         "prompt": "a red cup"},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    return EditJob.objects.get(pk=response.json()["id"])


def test_cost_policy_sends_to_chosen_worker(alice, settings, fleet_records, media_root,
                                                              monkeypatch, django_capture_on_commit_callbacks):
    settings.EDITOR_ROUTING = "cost"
    sent: list[str] = []
    monkeypatch.setattr(services.celery_app, "send_task", lambda name, args, queue: sent.append(queue))
    fleet_records("w1@h", load(busy_in=30.0, now=time.time()))
    fleet_records("w2@h", load(now=time.time()))
    job = submit(alice, settings, django_capture_on_commit_callbacks)
    assert job.queue_name == "edit.direct.w2@h"
    assert sent == ["edit.direct.w2@h"]
    backlog = redis_keys.client().hgetall(redis_keys.worker_backlog_key("w2@h"))
    assert float(backlog[str(job.pk).encode()]) > 0


def test_cost_policy_falls_back_to_buckets(alice, settings, fleet_records, media_root):
    settings.EDITOR_ROUTING = "cost"
    job = submit(alice, settings)
    assert job.queue_name == f"edit.flux.{job.bucket}"


def test_jobs_of_a_gone_worker_are_rerouted(alice, settings, fleet_records, media_root, monkeypatch,
                                            django_capture_on_commit_callbacks):
    settings.EDITOR_ROUTING = "cost"
    sent: list[str] = []
    monkeypatch.setattr(services.celery_app, "send_task", lambda name, args, queue: sent.append(queue))
    fleet_records("alive@h", load(now=time.time()))
    job = submit(alice, settings, django_capture_on_commit_callbacks)
    EditJob.objects.filter(pk=job.pk).update(queue_name=redis_keys.direct_queue("gone@h"))
    client = redis_keys.client()
    client.hset(redis_keys.worker_backlog_key("gone@h"), str(job.pk), "3.0")

    report = reconciler.reconcile_once()

    job.refresh_from_db()
    assert report.rerouted_jobs == [str(job.pk)]
    assert job.queue_name == "edit.direct.alive@h"
    assert job.status == JobStatus.QUEUED
    assert sent[-1] == "edit.direct.alive@h"
    assert not client.exists(redis_keys.worker_backlog_key("gone@h"))
    # A live worker's jobs stay where they are.
    assert reconciler.reconcile_once().rerouted_jobs == []


def test_real_worker_runs_cost_routed_job(api_client_for, celery_worker_process,
                                                                      settings):
    from editing.management.commands.edit import live_queues
    from tests.test_e2e_worker import poll_until_final

    settings.EDITOR_WARMUP_ON_CREATE = False
    client = api_client_for("routed")
    template = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("c.png", (PHOTOS / "coffee.png").read_bytes())},
        format="multipart",
    ).json()
    mask = np.zeros((400, 600), dtype=np.uint8)
    mask[150:250, 200:330] = 255
    payload = {"template": template["id"], "mask": SimpleUploadedFile("m.png", png_bytes(mask)),
               "prompt": "a cup", "steps": 2}
    first = client.post("/api/jobs/", payload, format="multipart").json()
    assert poll_until_final(client, first["id"])[0]["status"] == "succeeded"

    heartbeat = next(w for w in (cost_routing.fleet.live_workers() or []) if "flux" in w.models)
    assert redis_keys.direct_queue(heartbeat.hostname) in live_queues(timeout_s=2.0)
    record = json.loads(redis_keys.client().get(redis_keys.worker_load_key(heartbeat.hostname)))
    fit = record["costs"]["flux"]
    assert fit["step_s_per_token"] > 0
    assert fit["text_tokens"] > 0
    # The same fit is on the worker's metrics, which /metrics merges.
    metrics = redis_keys.client().get(redis_keys.worker_metrics_key(heartbeat.hostname)).decode()
    assert 'editor_cost_step_seconds_per_token{model="flux"}' in metrics

    settings.EDITOR_ROUTING = "cost"
    payload["mask"] = SimpleUploadedFile("m.png", png_bytes(mask))
    routed = client.post("/api/jobs/", payload, format="multipart").json()
    assert routed["queue"] == redis_keys.direct_queue(heartbeat.hostname)
    body, _ = poll_until_final(client, routed["id"])
    assert body["status"] == "succeeded", body["error"]
