"""Cache warm-ups: requesting them and their atomic state transitions.

A warm-up runs one full inference on a template with nothing masked, so a worker can cache the template's
activations for later masked edits. It runs automatically when a template is created (with the default
seed, steps and guidance, which most jobs use) and on demand through the API and admin.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from editing import catalog, fleet
from editing.failures import Failure
from editing.params import check_generation
from editing.models import CacheWarmup, EditJob, JobStatus, Template
from editing.routing import control_queue
from editor_site import redis_keys
from editor_site.celery import app as celery_app

logger = logging.getLogger(__name__)

RUN_WARMUP_TASK = "workers.tasks.run_warmup"
DROP_CACHE_ENTRIES_TASK = "workers.tasks.drop_cache_entries"
DEFAULT_GUIDANCE = 30.0


def request_warmup(
    template: Template,
    *,
    requested_by=None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    model: str | None = None,
    worker: str = "",
) -> CacheWarmup:
    """Queue a warm-up for these parameters, or return the one already queued or running.

    `model` defaults to the template's model, then to the deployment's default model. With `worker` (a
    hostname) the warm-up is sent to that worker's own queue, so its cache stores the entry.
    """
    spec = model_spec(template, model)
    params = {
        "seed": settings.EDITOR_DEFAULT_SEED if seed is None else seed,
        "steps": settings.EDITOR_DEFAULT_STEPS if steps is None else steps,
        "guidance": DEFAULT_GUIDANCE if guidance is None else guidance,
        "variant": cache_variant(spec),
        "model": spec.name,
    }
    check_generation(seed=params["seed"], steps=params["steps"], guidance=params["guidance"])
    with transaction.atomic():
        active = template.warmups.filter(
            status__in=[JobStatus.QUEUED, JobStatus.RUNNING], target_worker=worker, **params
        ).first()
        if active is not None:
            return active
        warmup = CacheWarmup.objects.create(
            template=template, requested_by=requested_by, target_worker=worker, **params
        )
        transaction.on_commit(lambda: enqueue_warmup(warmup))
    logger.info("warm-up %s queued for template %s on %s (%s)", warmup.pk, template.pk, worker or "any worker", params)
    return warmup


class NoLiveWorker(Exception):
    """No live worker serves the model, so there is no worker to warm."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class FleetUnreadable(Exception):
    """Redis did not respond, so which workers are live is unknown for now."""


def request_warmups_on_every_worker(
    template: Template,
    *,
    requested_by=None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    model: str | None = None,
) -> list[CacheWarmup]:
    """Queue one warm-up per live worker that serves the model, each on that worker's own queue.

    Every worker keeps its own cache, so with bucket routing a job reuses the entry only on a worker that
    warmed the template. Raises NoLiveWorker when no live worker serves the model, FleetUnreadable when Redis
    cannot be read.
    """
    spec = model_spec(template, model)
    workers = fleet.live_workers()
    if workers is None:
        raise FleetUnreadable()
    hostnames = sorted(worker.hostname for worker in workers if spec.name in worker.models)
    if not hostnames:
        raise NoLiveWorker(spec.name)
    return [
        request_warmup(
            template, requested_by=requested_by, seed=seed, steps=steps, guidance=guidance, model=spec.name,
            worker=hostname,
        )
        for hostname in hostnames
    ]


def model_spec(template: Template, model: str | None) -> catalog.ModelSpec:
    return catalog.get(model or template.model) or catalog.default_model()


def cache_variant(spec: catalog.ModelSpec) -> str:
    """EDITOR_CACHE_VARIANT where the model's family supports it, else the family's own variant."""
    variants = spec.facts.variants
    return settings.EDITOR_CACHE_VARIANT if settings.EDITOR_CACHE_VARIANT in variants else variants[0]


def enqueue_warmup(warmup: CacheWarmup, queue: str | None = None, countdown: float | None = None) -> None:
    """Send the warm-up to `queue`, else its requested worker's own queue, else its model's control queue.

    A warm-up requested for a worker that is no longer live goes to the control queue, so another worker
    runs it. A broker failure leaves it queued. With `countdown` the worker that receives the message waits
    that many seconds before running it.
    """
    queue = queue or requested_worker_queue(warmup) or control_queue(warmup.model or catalog.default_model().name)
    if not celery_app.conf.broker_url:
        logger.error("no broker is configured (set REDIS_URL); warm-up %s stays queued", warmup.pk)
        return
    try:
        celery_app.send_task(RUN_WARMUP_TASK, args=[warmup.pk], queue=queue, countdown=countdown)
    except Exception:  # noqa: BLE001 - any broker error; the row stays queued
        logger.exception("could not enqueue warm-up %s", warmup.pk)


def requested_worker_queue(warmup: CacheWarmup) -> str | None:
    """Return the own queue of the warm-up's requested worker while that worker is live (or Redis is unreadable)."""
    if not warmup.target_worker:
        return None
    workers = fleet.live_workers()
    if workers is not None and warmup.target_worker not in {worker.hostname for worker in workers}:
        logger.warning(
            "warm-up %s was requested for %s, which is not live; any worker of its model runs it",
            warmup.pk, warmup.target_worker,
        )
        return None
    return redis_keys.direct_queue(warmup.target_worker)


def queued_jobs_to_yield_to(warmup: CacheWarmup) -> int:
    """Count the queued edit jobs of the warm-up's model that it should let run first.

    A warm-up only speeds up later jobs, so it waits while edit jobs are queued. After
    EDITOR_WARMUP_MAX_DEFER_S from its request it runs anyway, so a busy service still warms its caches.
    """
    if timezone.now() - warmup.created_at > timedelta(seconds=settings.EDITOR_WARMUP_MAX_DEFER_S):
        return 0
    model = warmup.model or catalog.default_model().name
    return EditJob.objects.filter(status=JobStatus.QUEUED, model=model).count()


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


def fail(warmup_id: int, *, failure: Failure) -> bool:
    now = timezone.now()
    updated = CacheWarmup.objects.filter(pk=warmup_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).update(
        status=JobStatus.FAILED, **failure.fields(), finished_at=now, updated_at=now
    )
    return updated == 1


def record_inline_warmup(
    template: Template,
    *,
    seed: int,
    steps: int,
    guidance: float,
    variant: str,
    model: str,
    cache_key: str,
    cache_bytes: int,
    tier: str,
    timings: dict[str, float],
    worker: str,
) -> CacheWarmup:
    """Record a warm-up that a worker ran inside an edit job, so the cache it made counts as valid."""
    now = timezone.now()
    return CacheWarmup.objects.create(
        template=template, seed=seed, steps=steps, guidance=guidance, variant=variant, model=model,
        status=JobStatus.SUCCEEDED, progress=1.0, cache_key=cache_key, cache_bytes=cache_bytes,
        cache_tier=tier, timings=timings, worker=worker, attempts=1, started_at=now, finished_at=now,
    )


def valid_warmups():
    """Return the successful warm-ups whose caches were not dropped: each vouches for its cache entry."""
    return CacheWarmup.objects.filter(status=JobStatus.SUCCEEDED, dropped_at__isnull=True)


def cache_is_valid(cache_key: str) -> bool:
    """True while a successful, not dropped warm-up vouches for this cache entry."""
    return valid_warmups().filter(cache_key=cache_key).exists()


def vouched_cache_bytes(cache_key: str) -> int | None:
    """Return the size a valid warm-up recorded for this cache entry, or None when none vouches for it."""
    warmup = valid_warmups().filter(cache_key=cache_key).order_by("-finished_at").first()
    return None if warmup is None else int(warmup.cache_bytes or 0)


def cache_keys_of(template: Template) -> list[str]:
    """Return the cache key digests that the template's successful warm-ups recorded."""
    return list(
        template.warmups.filter(status=JobStatus.SUCCEEDED).exclude(cache_key="")
        .values_list("cache_key", flat=True).distinct()
    )


def drop_cache(template: Template) -> int:
    """Mark the template's cached activations as dropped and tell the live workers to remove them.

    Templates with the same image content share cache entries, so the warm-ups of other templates that vouch
    for the same keys are dropped too. A worker that is down when the drop commits removes the entries when
    it starts again, and every worker discards a dropped entry that a job looks up. Returns the number of
    warm-ups whose caches were dropped.
    """
    keys = cache_keys_of(template)
    dropped = valid_warmups().filter(Q(template=template) | Q(cache_key__in=keys)).update(dropped_at=timezone.now())
    logger.info("cache of template %s dropped (%d warm-ups)", template.pk, dropped)
    transaction.on_commit(lambda: send_cache_drops(keys))
    return dropped


def release_unvouched_entries(keys: list[str]) -> list[str]:
    """Tell the live workers to remove the entries among `keys` that no valid warm-up vouches for any more.

    Deleting a template deletes its warm-ups. Its entries stay in use while a warm-up of another template
    with the same image content vouches for the same key. Returns the keys sent.
    """
    vouched = set(valid_warmups().filter(cache_key__in=keys).values_list("cache_key", flat=True))
    unvouched = sorted(set(keys) - vouched)
    send_cache_drops(unvouched)
    return unvouched


def send_cache_drops(keys: list[str]) -> int:
    """Send every live worker, on its own queue, the cache key digests to remove; return the workers sent to.

    Best effort: without a broker or a readable Redis nothing is sent, and the entries leave the workers'
    tiers by eviction, or when a job looks one up and finds it dropped.
    """
    if not keys:
        return 0
    if not celery_app.conf.broker_url:
        logger.error("no broker is configured (set REDIS_URL); %d cache entries stay on the workers", len(keys))
        return 0
    workers = fleet.live_workers()
    if workers is None:
        logger.warning("worker heartbeats are unreadable; %d cache entries stay on the workers", len(keys))
        return 0
    sent = 0
    for worker in workers:
        try:
            celery_app.send_task(
                DROP_CACHE_ENTRIES_TASK, args=[sorted(keys)], queue=redis_keys.direct_queue(worker.hostname)
            )
        except Exception:  # noqa: BLE001 - any broker error; the entries stay until evicted
            logger.exception("could not send the drop of %d cache entries to %s", len(keys), worker.hostname)
            continue
        sent += 1
    logger.info("drop of %d cache entries sent to %d workers", len(keys), sent)
    return sent
