"""Cache warm-ups: requesting them and their atomic state transitions.

A warm-up runs one full inference on a template with nothing masked, so a worker can cache the template's
activations for later masked edits. It runs automatically when a template is created (with the default
seed, steps and guidance, which most jobs use) and on demand through the API and admin.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from editing.models import CacheWarmup, JobStatus, Template
from editing.routing import CONTROL_QUEUE
from editor_site.celery import app as celery_app

logger = logging.getLogger(__name__)

RUN_WARMUP_TASK = "workers.tasks.run_warmup"
DEFAULT_GUIDANCE = 30.0


def request_warmup(
    template: Template,
    *,
    requested_by=None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> CacheWarmup:
    """Queue a warm-up for these parameters, or return the one already queued or running."""
    params = {
        "seed": settings.EDITOR_DEFAULT_SEED if seed is None else seed,
        "steps": settings.EDITOR_DEFAULT_STEPS if steps is None else steps,
        "guidance": DEFAULT_GUIDANCE if guidance is None else guidance,
        "variant": settings.EDITOR_CACHE_VARIANT,
    }
    with transaction.atomic():
        active = template.warmups.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING], **params).first()
        if active is not None:
            return active
        warmup = CacheWarmup.objects.create(template=template, requested_by=requested_by, **params)
        transaction.on_commit(lambda: enqueue_warmup(warmup))
    logger.info("warm-up %s queued for template %s (%s)", warmup.pk, template.pk, params)
    return warmup


def enqueue_warmup(warmup: CacheWarmup, queue: str = CONTROL_QUEUE) -> None:
    if not celery_app.conf.broker_url:
        logger.error("no broker is configured (set REDIS_URL); warm-up %s stays queued", warmup.pk)
        return
    try:
        celery_app.send_task(RUN_WARMUP_TASK, args=[warmup.pk], queue=queue)
    except Exception:  # noqa: BLE001 - any broker error; the row stays queued
        logger.exception("could not enqueue warm-up %s", warmup.pk)


def claim(warmup_id: int, *, worker: str) -> bool:
    now = timezone.now()
    updated = CacheWarmup.objects.filter(pk=warmup_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).update(
        status=JobStatus.RUNNING, worker=worker, progress=0.0, started_at=now, updated_at=now
    )
    return updated == 1


def report_progress(warmup_id: int, progress: float) -> bool:
    updated = CacheWarmup.objects.filter(pk=warmup_id, status=JobStatus.RUNNING).update(
        progress=max(0.0, min(1.0, progress)), updated_at=timezone.now()
    )
    return updated == 1


def succeed(warmup_id: int, *, cache_key: str, cache_bytes: int, tier: str, timings: dict[str, float]) -> bool:
    now = timezone.now()
    updated = CacheWarmup.objects.filter(pk=warmup_id, status=JobStatus.RUNNING).update(
        status=JobStatus.SUCCEEDED, progress=1.0, cache_key=cache_key, cache_bytes=cache_bytes,
        cache_tier=tier, timings=timings, finished_at=now, updated_at=now,
    )
    return updated == 1


def fail(warmup_id: int, *, error: str) -> bool:
    now = timezone.now()
    updated = CacheWarmup.objects.filter(pk=warmup_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).update(
        status=JobStatus.FAILED, error=error, finished_at=now, updated_at=now
    )
    return updated == 1
