"""Atomic job state transitions: the loser of a race gets False, never an inconsistent row."""

from __future__ import annotations

import pytest
from django.core.files.base import ContentFile

from editing import jobstate
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


def test_fail_keeps_final_states(job):
    jobstate.claim(job.pk, worker="w")
    jobstate.succeed(job.pk, result_name="r.png", timings={})
    assert jobstate.fail(job.pk, error="late failure") is False
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
