"""Running jobs on a worker: edit jobs (claim, read, run, store) and cache warm-ups.

The database row is the source of truth. Each step re-checks the row's state, so a job cancelled,
finished elsewhere or deleted while it waited is skipped without error.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import close_old_connections
from django.utils import timezone

from editing import imaging, jobstate, warmups
from editing.models import CacheOutcome, CacheWarmup, EditJob, JobStatus
from workers import caching
from workers.metrics_publisher import publish_metrics
from workers.model_loading import get_model
from workers.runner import EditRequest, JobCancelled, RunnerSettings, prepare_working_inputs, run_edit

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Progress is written at most this often, so a fast model does not flood the database.
PROGRESS_MIN_INTERVAL_S = 0.2


class StepReporter:
    """Stores per-step progress of an edit job and raises ``JobCancelled`` once a cancel was requested.

    ``start`` and ``span`` map the steps of one phase onto a part of the job's progress bar, so a
    warm-up run before the edit fills the first half and the edit the second.
    """

    def __init__(self, job_id: uuid.UUID, *, start: float = 0.0, span: float = 1.0) -> None:
        self.job_id = job_id
        self.start = start
        self.span = span
        self.last_write = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_write < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_write = now
        # The last step is reported as 99%: decoding and storing still follow.
        fraction = min(self.start + self.span * done / max(total, 1), 0.99)
        if not jobstate.report_progress(self.job_id, fraction) or jobstate.is_cancel_requested(self.job_id):
            raise JobCancelled(f"job {self.job_id} was cancelled at step {done}/{total}")


def read_png(field_file) -> np.ndarray:
    with field_file.open("rb") as handle:
        return imaging.decode_png(handle.read())


def read_inputs(job: EditJob) -> tuple[np.ndarray, np.ndarray]:
    image = read_png(job.template.image)
    mask = read_png(job.mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return image, mask > 127


def pending_jobs_like(job: EditJob) -> int:
    """Queued jobs that would use the same cache entry as ``job``."""
    return EditJob.objects.filter(
        template_id=job.template_id, status=JobStatus.QUEUED, seed=job.seed, steps=job.steps,
        guidance=job.guidance,
    ).exclude(pk=job.pk).count()


def execute_job(job_id: str, *, worker: str, redelivered: bool = False) -> None:
    close_old_connections()
    job = EditJob.objects.select_related("template").filter(pk=job_id).first()
    if job is None:
        logger.info("job %s no longer exists; skipping", job_id)
        return
    if job.is_final:
        logger.info("job %s is already %s; skipping the delivery", job_id, job.status)
        return
    if job.attempts >= MAX_ATTEMPTS:
        jobstate.fail(job.pk, error=f"The job was interrupted {job.attempts} times; giving up.")
        logger.error("job %s failed after %d attempts", job_id, job.attempts)
        return
    # A running job is taken over only when its previous worker is gone: the broker redelivered the
    # message, or the job has written no progress for EDITOR_STALE_RUNNING_S. A duplicate message of a
    # job that is running elsewhere is otherwise a no-op.
    stale = (timezone.now() - job.updated_at).total_seconds() > settings.EDITOR_STALE_RUNNING_S
    if not jobstate.claim(job.pk, worker=worker, allow_restart=redelivered or stale):
        logger.info("job %s could not be claimed (status %s); skipping", job_id, job.status)
        return
    if job.status == JobStatus.RUNNING:
        logger.warning("job %s restarts after an interrupted attempt on %s", job_id, job.worker or "a worker")

    timings: dict[str, float] = {}
    try:
        result, decision = run_job(job, timings)
        start = time.perf_counter()
        png = imaging.encode_png(result.image)
        stored = job.result.storage.save(f"results/{uuid.uuid4().hex}.png", ContentFile(png))
        timings["store"] = (time.perf_counter() - start) * 1000
    except JobCancelled:
        jobstate.finish_cancelled(job.pk)
        logger.info("job %s cancelled while running", job_id)
        return
    except Exception as error:  # noqa: BLE001 - any failure ends this job, never the worker
        logger.exception("job %s failed", job_id)
        jobstate.fail(job.pk, error=f"{type(error).__name__}: {error}", timings=timings)
        return

    if not jobstate.succeed(job.pk, result_name=stored, timings=timings):
        # Cancelled or finished by another attempt meanwhile: keep exactly one stored result.
        job.result.storage.delete(stored)
        logger.info("job %s finished elsewhere; discarded this attempt's result", job_id)
        return
    EditJob.objects.filter(pk=job.pk).update(
        cache_outcome=decision.outcome,
        cache_variant=settings.EDITOR_CACHE_VARIANT if decision.key else "",
        cache_key=decision.key.digest() if decision.key else "",
        flop_fraction=decision.flop_fraction,
    )
    publish_metrics(worker)
    if decision.queue_warmup:
        warmups.request_warmup(job.template, seed=job.seed, steps=job.steps, guidance=job.guidance)
    logger.info(
        "job %s succeeded on %s (cache %s, %.0f%% of full FLOPs): %s",
        job_id, worker, decision.outcome, decision.flop_fraction * 100,
        " ".join(f"{phase}={ms:.0f}ms" for phase, ms in timings.items()),
    )


def run_job(job: EditJob, timings: dict[str, float]):
    """Read the job's inputs, pick the cache path and run the edit; fills ``timings`` in place."""
    runner_settings = RunnerSettings.from_env()
    start = time.perf_counter()
    image, mask = read_inputs(job)
    model = get_model()
    timings["load"] = (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    template = caching.working_template(model, image, runner_settings)
    inputs = prepare_working_inputs(image, mask, runner_settings.max_work_pixels, model.pipe.vae_scale_factor * 2)
    variant = settings.EDITOR_CACHE_VARIANT
    key = caching.job_cache_key(
        model, inputs, template_hash=job.template.content_hash, steps=job.steps, seed=job.seed,
        guidance=job.guidance, variant=variant, settings=runner_settings,
    )
    fraction = caching.masked_flop_fraction(model, inputs, variant=variant, settings=runner_settings)
    decision = caching.decide(model, key, fraction, pending_same_key=pending_jobs_like(job))
    timings["cache_lookup"] = (time.perf_counter() - start) * 1000

    activations = decision.activations
    edit_progress = StepReporter(job.pk)
    if decision.outcome == CacheOutcome.MISS_WARM_FIRST:
        outcome = caching.warm_template(
            model, template, key, settings=runner_settings, on_step=StepReporter(job.pk, span=0.5)
        )
        timings.update(outcome.timings_ms)
        activations = outcome.activations
        edit_progress = StepReporter(job.pk, start=0.5, span=0.5)

    request = EditRequest(
        image=image, mask=mask, prompt=job.prompt, seed=job.seed, steps=job.steps, guidance=job.guidance
    )
    result = run_edit(model, request, on_step=edit_progress, settings=runner_settings, activations=activations)
    timings.update(result.timings_ms)
    return result, decision


def execute_warmup(warmup_id: int, *, worker: str) -> None:
    close_old_connections()
    warmup = CacheWarmup.objects.select_related("template").filter(pk=warmup_id).first()
    if warmup is None or warmup.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        logger.info("warm-up %s is gone or finished; skipping", warmup_id)
        return
    if not warmups.claim(warmup.pk, worker=worker):
        return
    try:
        runner_settings = RunnerSettings.from_env()
        image = read_png(warmup.template.image)
        model = get_model()
        template = caching.working_template(model, image, runner_settings)
        key = caching.job_cache_key(
            model, template, template_hash=warmup.template.content_hash, steps=warmup.steps,
            seed=warmup.seed, guidance=warmup.guidance, variant=warmup.variant, settings=runner_settings,
        )

        def report(done: int, total: int) -> None:
            warmups.report_progress(warmup.pk, min(done / max(total, 1), 0.99))

        outcome = caching.warm_template(model, template, key, settings=runner_settings, on_step=report)
    except Exception as error:  # noqa: BLE001 - a failed warm-up only costs later jobs their cache hit
        logger.exception("warm-up %s of template %s failed", warmup_id, warmup.template_id)
        warmups.fail(warmup.pk, error=f"{type(error).__name__}: {error}")
        return
    publish_metrics(worker)
    warmups.succeed(
        warmup.pk, cache_key=outcome.key.digest(), cache_bytes=outcome.nbytes, tier=outcome.tier,
        timings=outcome.timings_ms,
    )
