"""Warm-ups yield to queued edit jobs of their model, for a bounded time."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from editing import services, warmups
from editing.models import CacheWarmup, EditJob, JobStatus
from tests.conftest import job_row

pytestmark = pytest.mark.django_db


@pytest.fixture
def template(make_user, media_root, settings):
    settings.EDITOR_WARMUP_ON_CREATE = False
    return services.create_template(owner=make_user("alice"), name="t", image=np.zeros((32, 32, 3), dtype=np.uint8))


def queued_job(template, model: str = "flux") -> EditJob:
    return job_row(template, model=model)


def queued_warmup(template, model: str = "flux") -> CacheWarmup:
    return CacheWarmup.objects.create(
        template=template, model=model, seed=0, steps=4, guidance=30.0, variant="kv", status=JobStatus.QUEUED
    )


def test_warmup_yields_to_queued_jobs(template):
    warmup = queued_warmup(template)
    assert warmups.queued_jobs_to_yield_to(warmup) == 0

    queued_job(template)
    queued_job(template, model="other")
    assert warmups.queued_jobs_to_yield_to(warmup) == 1


def test_warmup_stops_yielding_after_max_defer(template, settings):
    settings.EDITOR_WARMUP_MAX_DEFER_S = 600
    warmup = queued_warmup(template)
    queued_job(template)
    CacheWarmup.objects.filter(pk=warmup.pk).update(created_at=timezone.now() - timedelta(seconds=601))
    warmup.refresh_from_db()

    assert warmups.queued_jobs_to_yield_to(warmup) == 0


def test_worker_sends_deferred_warmup_back(template, settings, monkeypatch):
    from workers import execution

    settings.EDITOR_WARMUP_DEFER_S = 7
    warmup = queued_warmup(template)
    queued_job(template)
    sent = []
    monkeypatch.setattr(warmups, "enqueue_warmup", lambda row, queue=None, countdown=None: sent.append((row.pk, countdown)))
    # The test's transaction keeps open the connection that a worker would close between tasks.
    monkeypatch.setattr(execution, "close_old_connections", lambda: None)

    execution.execute_warmup(warmup.pk, worker="w1")

    warmup.refresh_from_db()
    assert warmup.status == JobStatus.QUEUED
    assert warmup.attempts == 0
    assert sent == [(warmup.pk, 7)]


def test_warmup_publishes_cost_fit(template, redis_url, tmp_path, monkeypatch):
    """A worker that has only warmed so far must still publish a fit, or the cost policy cannot weigh it."""
    import json
    from types import SimpleNamespace

    from editor_site import redis_keys
    from workers import caching, execution, worker_state

    monkeypatch.setenv("EDITOR_VAR_DIR", str(tmp_path))
    monkeypatch.setattr(worker_state, "_cost_models", {})
    monkeypatch.setattr(worker_state, "_calibrate_into", lambda *args: None)
    monkeypatch.setattr(execution, "close_old_connections", lambda: None)
    model = SimpleNamespace(name="flux", pipe=None, family=SimpleNamespace(text_tokens=lambda pipe, length: 77))
    monkeypatch.setattr(execution, "get_model", lambda name=None: model)

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the cost model step")

    monkeypatch.setattr(caching, "working_template", stop)
    client = redis_keys.client()
    client.delete(redis_keys.worker_load_key("w9@test"))
    warmup = queued_warmup(template)

    execution.execute_warmup(warmup.pk, worker="w9@test")

    record = json.loads(client.get(redis_keys.worker_load_key("w9@test")))
    client.delete(redis_keys.worker_load_key("w9@test"))
    assert record["costs"]["flux"]["text_tokens"] == 77
    assert record["costs"]["flux"]["step_s_per_token"] == worker_state.PRIOR_FIT.step_s_per_token
