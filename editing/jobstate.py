"""State transitions of edit jobs, each one atomic conditional UPDATE.

A transition returns ``True`` when it moved the job and ``False`` when the job was not in the expected
state; losing such a race is normal (a cancelled job, a redelivered message) and never an error.
A transition to ``cancelled`` also decrements the use count of the job's template, in the same database
transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from editing.failures import Failure
from editing.models import EditJob, JobStatus, Template


def claim(
    job_id: uuid.UUID | str, *, worker: str, allow_restart: bool = False, silent_before: datetime | None = None
) -> bool:
    """Move a queued job to running for ``worker``.

    A job left ``running`` is taken over too with ``allow_restart`` (the broker redelivered the message, so
    its previous worker is gone), or when it has reported nothing since ``silent_before``. The second test
    is part of the UPDATE, so two deliveries that both saw a silent job cannot both take it over.
    """
    condition = Q(status=JobStatus.QUEUED)
    if allow_restart:
        condition |= Q(status=JobStatus.RUNNING)
    elif silent_before is not None:
        condition |= Q(status=JobStatus.RUNNING, updated_at__lt=silent_before)
    updated = EditJob.objects.filter(condition, pk=job_id, cancel_requested=False).update(
        status=JobStatus.RUNNING,
        worker=worker,
        progress=0.0,
        attempts=F("attempts") + 1,
        started_at=timezone.now(),
        updated_at=timezone.now(),
    )
    return updated == 1


def report_progress(job_id: uuid.UUID | str, progress: float) -> bool:
    """Store progress in [0, 1]; return False when the job is no longer running."""
    updated = EditJob.objects.filter(pk=job_id, status=JobStatus.RUNNING).update(
        progress=max(0.0, min(1.0, progress)), updated_at=timezone.now()
    )
    return updated == 1


def succeed(
    job_id: uuid.UUID | str,
    *,
    result_name: str,
    timings: dict[str, float],
    details: dict[str, object] | None = None,
) -> bool:
    """Store the result and ``details`` (such as the cache outcome) in one UPDATE.

    A client that reads ``succeeded`` therefore reads the details too.
    """
    updated = EditJob.objects.filter(pk=job_id, status=JobStatus.RUNNING).update(
        status=JobStatus.SUCCEEDED,
        result=result_name,
        timings=timings,
        progress=1.0,
        error="",
        error_code="",
        error_params={},
        finished_at=timezone.now(),
        updated_at=timezone.now(),
        **(details or {}),
    )
    return updated == 1


def fail(job_id: uuid.UUID | str, *, failure: Failure, timings: dict[str, float] | None = None) -> bool:
    fields: dict[str, object] = {
        "status": JobStatus.FAILED,
        **failure.fields(),
        "finished_at": timezone.now(),
        "updated_at": timezone.now(),
    }
    if timings is not None:
        fields["timings"] = timings
    updated = EditJob.objects.filter(pk=job_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).update(
        **fields
    )
    return updated == 1


def _decrement_use_count(job_id: uuid.UUID | str) -> None:
    """Decrement the use count of a just-cancelled job's template, so that it counts jobs not cancelled."""
    Template.objects.filter(jobs__pk=job_id, use_count__gt=0).update(use_count=F("use_count") - 1)


@transaction.atomic
def cancel_queued(job_id: uuid.UUID | str) -> bool:
    updated = EditJob.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
        status=JobStatus.CANCELLED,
        cancel_requested=True,
        finished_at=timezone.now(),
        updated_at=timezone.now(),
    )
    if updated:
        _decrement_use_count(job_id)
    return updated == 1


def request_cancel_running(job_id: uuid.UUID | str) -> bool:
    """Flag a running job; its worker stops at the next denoising step boundary."""
    updated = EditJob.objects.filter(pk=job_id, status=JobStatus.RUNNING).update(
        cancel_requested=True, updated_at=timezone.now()
    )
    return updated == 1


@transaction.atomic
def cancel_stale(job_id: uuid.UUID | str, silent_before: datetime) -> bool:
    """Cancel a running job that was asked to stop but has reported nothing since `silent_before`.

    Its worker is gone, and a cancel-requested job is never claimed again, so nothing else would end it.
    """
    updated = EditJob.objects.filter(
        pk=job_id, status=JobStatus.RUNNING, cancel_requested=True, updated_at__lt=silent_before
    ).update(status=JobStatus.CANCELLED, finished_at=timezone.now(), updated_at=timezone.now())
    if updated:
        _decrement_use_count(job_id)
    return updated == 1


@transaction.atomic
def finish_cancelled(job_id: uuid.UUID | str, *, timings: dict[str, float] | None = None) -> bool:
    """End a running job as cancelled, keeping the `timings` of the phases it ran (when given)."""
    fields: dict[str, object] = {
        "status": JobStatus.CANCELLED, "finished_at": timezone.now(), "updated_at": timezone.now()
    }
    if timings:
        fields["timings"] = timings
    updated = EditJob.objects.filter(pk=job_id, status=JobStatus.RUNNING).update(**fields)
    if updated:
        _decrement_use_count(job_id)
    return updated == 1


def is_cancel_requested(job_id: uuid.UUID | str) -> bool:
    return EditJob.objects.filter(pk=job_id, cancel_requested=True).exists()
