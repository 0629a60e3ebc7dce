"""Atomic job state transitions: the loser of a race gets False, never an inconsistent row."""

from __future__ import annotations

import pytest
from django.core.files.base import ContentFile

from editing import jobstate
from editing.failures import Failure
from editing.models import EditJob, JobStatus, Template

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(make_user, media_root) -> EditJob:
    owner = make_user("alice")
    template = Template(owner=owner, name="t", width=16, height=16, content_hash="0" * 64)
    template.image.save("t.png", ContentFile(b"x"), save=False)
    template.save()
    job = EditJob(
        owner=owner, template=template, prompt="p", seed=0, steps=4, guidance=30.0,
        mask_ratio=0.1, bucket="m10", queue_name="edit.flux.m10",
    )
    job.mask.save("m.png", ContentFile(b"x"), save=False)
    job.save()
    return job


def status_of(job: EditJob) -> str:
    job.refresh_from_db()
    return job.status


def test_claim_once(job):
    assert jobstate.claim(job.pk, worker="w1") is True
    assert jobstate.claim(job.pk, worker="w2") is False
    job.refresh_from_db()
    assert job.worker == "w1"
    assert job.attempts == 1


def test_silent_job_is_taken_over_once(job):
    from datetime import timedelta

    from django.utils import timezone

    jobstate.claim(job.pk, worker="w1")
    # Still reporting: not silent before a moment ago.
    assert jobstate.claim(job.pk, worker="w2", silent_before=timezone.now() - timedelta(seconds=60)) is False
    EditJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=120))
    silent_before = timezone.now() - timedelta(seconds=60)
    # Two deliveries that both saw the silent row: only the first takes it over.
    assert jobstate.claim(job.pk, worker="w2", silent_before=silent_before) is True
    assert jobstate.claim(job.pk, worker="w3", silent_before=silent_before) is False
    job.refresh_from_db()
    assert (job.worker, job.attempts) == ("w2", 2)


def test_restart_claim_takes_over_running_job(job):
    jobstate.claim(job.pk, worker="w1")
    assert jobstate.claim(job.pk, worker="w2", allow_restart=True) is True
    job.refresh_from_db()
    assert (job.worker, job.attempts) == ("w2", 2)


def test_succeed_only_from_running(job):
    assert jobstate.succeed(job.pk, result_name="r.png", timings={}) is False
    jobstate.claim(job.pk, worker="w")
    assert jobstate.succeed(job.pk, result_name="r.png", timings={"denoise": 1.0}) is True
    assert jobstate.succeed(job.pk, result_name="other.png", timings={}) is False
    job.refresh_from_db()
    assert job.result.name == "r.png"
    assert job.progress == 1.0


def test_cancelled_queued_job_cannot_be_claimed(job):
    assert jobstate.cancel_queued(job.pk) is True
    assert jobstate.claim(job.pk, worker="w", allow_restart=True) is False
    assert status_of(job) == JobStatus.CANCELLED


def test_running_cancel_is_a_request(job):
    jobstate.claim(job.pk, worker="w")
    assert jobstate.cancel_queued(job.pk) is False
    assert jobstate.request_cancel_running(job.pk) is True
    assert jobstate.is_cancel_requested(job.pk) is True
    assert status_of(job) == JobStatus.RUNNING
    assert jobstate.finish_cancelled(job.pk) is True
    assert status_of(job) == JobStatus.CANCELLED


def use_count_of(job: EditJob) -> int:
    return Template.objects.get(pk=job.template_id).use_count


def cancel_while_queued(job: EditJob) -> bool:
    return jobstate.cancel_queued(job.pk)


def cancel_while_running(job: EditJob) -> bool:
    jobstate.claim(job.pk, worker="w")
    jobstate.request_cancel_running(job.pk)
    return jobstate.finish_cancelled(job.pk)


def cancel_after_silence(job: EditJob) -> bool:
    from datetime import timedelta

    from django.utils import timezone

    jobstate.claim(job.pk, worker="w")
    jobstate.request_cancel_running(job.pk)
    EditJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=120))
    return jobstate.cancel_stale(job.pk, timezone.now() - timedelta(seconds=60))


@pytest.mark.parametrize("cancel", [cancel_while_queued, cancel_while_running, cancel_after_silence])
def test_cancel_decrements_use_count_once(job, cancel):
    Template.objects.filter(pk=job.template_id).update(use_count=3)

    assert cancel(job) is True
    assert use_count_of(job) == 2
    # A second cancel finds the job cancelled already and leaves the count alone.
    assert cancel(job) is False
    assert use_count_of(job) == 2


def test_failed_job_keeps_use_count(job):
    Template.objects.filter(pk=job.template_id).update(use_count=1)
    assert jobstate.fail(job.pk, failure=Failure("edit_error", {"detail": "boom"})) is True
    assert use_count_of(job) == 1


def test_use_count_migration_subtracts_cancelled_jobs(job):
    import importlib

    from django.apps import apps

    migration = importlib.import_module("editing.migrations.0008_use_count_without_cancelled")
    Template.objects.filter(pk=job.template_id).update(use_count=5)
    EditJob.objects.filter(pk=job.pk).update(status=JobStatus.CANCELLED)
    migration.subtract_cancelled_jobs(apps, None)
    assert use_count_of(job) == 4


def test_fail_keeps_final_states(job):
    jobstate.claim(job.pk, worker="w")
    jobstate.succeed(job.pk, result_name="r.png", timings={})
    assert jobstate.fail(job.pk, failure=Failure("edit_error", {"detail": "late failure"})) is False
    assert status_of(job) == JobStatus.SUCCEEDED


def test_progress_is_clamped_and_only_for_running(job):
    assert jobstate.report_progress(job.pk, 0.5) is False
    jobstate.claim(job.pk, worker="w")
    assert jobstate.report_progress(job.pk, 7.0) is True
    job.refresh_from_db()
    assert job.progress == 1.0


def test_succeed_stores_details_with_status(job):
    jobstate.claim(job.pk, worker="w")
    details = {"cache_outcome": "hit", "flop_fraction": 0.25}
    assert jobstate.succeed(job.pk, result_name="r.png", timings={}, details=details) is True
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED
    assert job.cache_outcome == "hit"
    assert job.flop_fraction == 0.25


def test_stale_cancelled_job_not_resent(job, redis_url):
    from editing import reconciler

    jobstate.claim(job.pk, worker="gone@host")
    jobstate.request_cancel_running(job.pk)
    EditJob.objects.filter(pk=job.pk).update(updated_at=job.updated_at.replace(year=2000))

    report = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)

    assert report.cancelled_stale_jobs == [str(job.pk)]
    assert report.stale_jobs == []
    assert status_of(job) == JobStatus.CANCELLED


@pytest.mark.parametrize(
    ("heartbeat", "expected"),
    [
        (None, JobStatus.CANCELLED),  # the worker is gone
        (-60.0, JobStatus.RUNNING),  # the process that claimed the job still runs: it stops at its next step
        (+60.0, JobStatus.CANCELLED),  # a process of the same name started after the claim
    ],
)
def test_cancel_ends_orphaned_job(job, redis_url, heartbeat, expected):
    import json

    from editing import services
    from editor_site import redis_keys

    jobstate.claim(job.pk, worker="w1@host")
    job.refresh_from_db()
    key = redis_keys.worker_state_key("w1@host")
    client = redis_keys.client()
    if heartbeat is not None:
        started_at = job.started_at.timestamp() + heartbeat
        record = {"hostname": "w1@host", "models": ["flux"], "queues": [], "started_at": started_at}
        client.set(key, json.dumps(record), ex=30)
    try:
        assert services.cancel_job(job) is True
    finally:
        client.delete(key)

    assert status_of(job) == expected
    assert job.cancel_requested is True


def test_reconciler_restarts_orphaned_job(job, redis_url, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from editing import reconciler, services

    sent = []
    monkeypatch.setattr(services, "enqueue", lambda job, chosen=None, takeover=False: sent.append((job.pk, takeover)))
    jobstate.claim(job.pk, worker="gone@host")
    EditJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=45))

    report = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)
    again = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)

    assert report.orphaned_jobs == [str(job.pk)]
    assert again.orphaned_jobs == []
    assert sent == [(job.pk, True)]
    assert status_of(job) == JobStatus.RUNNING


def test_reconciler_leaves_new_claim(job, redis_url, monkeypatch):
    from editing import reconciler, services

    sent = []
    monkeypatch.setattr(services, "enqueue", lambda job, chosen=None, takeover=False: sent.append(job.pk))
    jobstate.claim(job.pk, worker="gone@host")  # just claimed: not silent for long enough

    report = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)

    assert report.orphaned_jobs == []
    assert sent == []


def test_restarted_worker_job_resent_at_once(job, redis_url, monkeypatch):
    import json

    from editing import reconciler, services
    from editor_site import redis_keys

    sent = []
    monkeypatch.setattr(services, "enqueue", lambda job, chosen=None, takeover=False: sent.append((job.pk, takeover)))
    jobstate.claim(job.pk, worker="w1@host")
    job.refresh_from_db()
    key = redis_keys.worker_state_key("w1@host")
    client = redis_keys.client()
    claimed_at = job.started_at.timestamp()
    try:
        # The process that claimed the job still publishes: the job just started, nothing to do.
        record = {"hostname": "w1@host", "models": ["flux"], "queues": [], "started_at": claimed_at - 60}
        client.set(key, json.dumps(record), ex=30)
        still_running = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)
        # A new process of the same name: the job is re-sent without waiting for silence.
        record["started_at"] = claimed_at + 5
        client.set(key, json.dumps(record), ex=30)
        restarted = reconciler.reconcile_once(requeue_after_s=60, stale_after_s=600)
    finally:
        client.delete(key)

    assert still_running.orphaned_jobs == []
    assert restarted.orphaned_jobs == [str(job.pk)]
    assert sent == [(job.pk, True)]
