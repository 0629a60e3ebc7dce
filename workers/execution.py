"""Running jobs on a worker: edit jobs (claim, read, run, store) and cache warm-ups.

The database row is the source of truth. Each step re-checks the row's state, so a job cancelled,
finished elsewhere or deleted while it waited is skipped without error.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from cache.keys import CacheKey
from editing import catalog, imaging, jobstate, warmups
from editing.failures import Failure, exception_failure
from editing.models import CacheOutcome, CacheWarmup, EditJob, JobStatus
from workers import batching, caching, residency, worker_state
from workers.metrics_publisher import publish_metrics
from workers.model_loading import get_model
from workers.runner import EditRequest, JobCancelled, RunnerSettings, prepare_working_inputs, run_edit
from workers.template_cache import get_store

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Progress is written at most this often, so a fast model does not flood the database.
PROGRESS_MIN_INTERVAL_S = 0.2
# After running out of memory the job is retried once with its working size divided by this (pixels).
OOM_SHRINK_FACTOR = 4
MIN_WORK_PIXELS = 16 * 16


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """Host and accelerator out-of-memory exception types (torch.OutOfMemoryError covers CUDA)."""
    import torch

    return (MemoryError, torch.OutOfMemoryError)


class JobOutOfMemory(Exception):
    """The job ran out of memory at its full working size and again at the reduced size."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.english())
        self.failure = failure


def release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def storage_failure(error: OSError) -> Failure:
    if error.errno == errno.ENOSPC:
        return Failure("disk_full", {"detail": str(error)})
    return Failure("storage", {"detail": f"{type(error).__name__}: {error}"})


class JobTimedOut(SoftTimeLimitExceeded):
    """The job ran past its soft time limit, noticed at a step boundary.

    Celery raises SoftTimeLimitExceeded itself only in the prefork pool. The threads pool that the batching
    engine needs has no time limits, so the step callback enforces the same limit there.
    """


class StepReporter:
    """Stores per-step progress of an edit job and raises ``JobCancelled`` once a cancel was requested.

    ``start`` and ``span`` map the steps of one phase onto a part of the job's progress bar, so a
    warm-up run before the edit fills the first half and the edit the second.
    """

    def __init__(
        self, job_id: uuid.UUID, *, start: float = 0.0, span: float = 1.0, deadline: float | None = None
    ) -> None:
        self.job_id = job_id
        self.start = start
        self.span = span
        self.deadline = deadline  # time.monotonic() after which the job times out, at a step boundary
        self.last_write = 0.0
        self.fraction = start

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline and done < total:
            raise JobTimedOut(f"job {self.job_id} passed its time limit at step {done}/{total}")
        if done < total and now - self.last_write < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_write = now
        # The last step is reported as 99%: decoding and storing still follow.
        self.fraction = min(self.start + self.span * done / max(total, 1), 0.99)
        if not jobstate.report_progress(self.job_id, self.fraction) or jobstate.is_cancel_requested(self.job_id):
            raise JobCancelled(f"job {self.job_id} was cancelled at step {done}/{total}")

    def keep_alive(self) -> None:
        """Refresh the job's row while it waits for the model, so it does not look abandoned; honour a cancel.

        In the threads pool several claimed jobs of one worker wait for the model while another runs.
        """
        self.last_write = time.monotonic()
        if not jobstate.report_progress(self.job_id, self.fraction) or jobstate.is_cancel_requested(self.job_id):
            raise JobCancelled(f"job {self.job_id} was cancelled while waiting for the model")


def read_png(field_file) -> np.ndarray:
    with field_file.open("rb") as handle:
        return imaging.decode_png(handle.read())


def read_inputs(job: EditJob) -> tuple[np.ndarray, np.ndarray]:
    image = read_png(job.template.image)
    mask = read_png(job.mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return image, mask > 127


PREFETCH_LOOKAHEAD = 4


def model_cache_variant(model) -> str:
    """Return the cache variant of jobs on this model (EDITOR_CACHE_VARIANT where its family supports it)."""
    return warmups.cache_variant(catalog.get(model.name) or catalog.default_model())


def prefetch_for_waiting_jobs(model, job: EditJob, runner_settings: RunnerSettings) -> None:
    """Start promoting the disk-resident caches of the next queued jobs while this one runs."""
    waiting = (
        EditJob.objects.filter(status=JobStatus.QUEUED, model=job.model).exclude(pk=job.pk)
        .select_related("template").order_by("created_at")[:PREFETCH_LOOKAHEAD]
    )
    variant = model_cache_variant(model)
    keys = []
    for other in waiting:
        size = caching.working_size(model, other.template.width, other.template.height, runner_settings)
        keys.append(caching.cache_key(
            model, template_hash=other.template.content_hash, working_size=size, steps=other.steps,
            seed=other.seed, guidance=other.guidance, variant=variant,
            warmup_prompt=caching.WARMUP_PROMPT, max_sequence_length=runner_settings.max_sequence_length,
        ))
    started = caching.prefetch_keys(keys)
    if started:
        logger.info("prefetching %d disk caches for queued jobs", started)


def pending_jobs_like(job: EditJob) -> int:
    """Queued jobs that would use the same cache entry as ``job``."""
    return EditJob.objects.filter(
        template_id=job.template_id, status=JobStatus.QUEUED, seed=job.seed, steps=job.steps,
        guidance=job.guidance, model=job.model,
    ).exclude(pk=job.pk).count()


class DatabaseConnectionLost(Exception):
    """The database connection failed while a job ran; the job is still ``running`` in the database."""


def discard_unrecorded_result(job: EditJob, stored: str) -> None:
    """Delete a stored result unless the success UPDATE committed before the connection failed."""
    connection.close()
    try:
        recorded = EditJob.objects.filter(pk=job.pk, result=stored).exists()
    except DatabaseError:
        # Unknown whether the UPDATE committed: keep the file, because an orphan file costs only disk
        # space while a recorded result without its file is a lost result.
        logger.warning("job %s: kept result %s because the database is unreachable", job.pk, stored)
        return
    if not recorded:
        job.result.storage.delete(stored)


def execute_job(
    job_id: str, *, worker: str, redelivered: bool = False, soft_time_limit_s: float | None = None
) -> None:
    """Claim and run one edit job.

    Raises DatabaseConnectionLost when the database connection fails after the claim, so the task
    can re-send the job for another attempt.
    """
    close_old_connections()
    worker_state.take_from_backlog(worker, str(job_id))
    job = EditJob.objects.select_related("template").filter(pk=job_id).first()
    if job is None:
        logger.info("job %s no longer exists; skipping", job_id)
        return
    if job.is_final:
        logger.info("job %s is already %s; skipping the delivery", job_id, job.status)
        return
    if job.attempts >= MAX_ATTEMPTS:
        jobstate.fail(job.pk, failure=Failure("interrupted", {"attempts": job.attempts}))
        logger.error("job %s failed after %d attempts", job_id, job.attempts)
        return
    # A running job is taken over only when its previous worker is gone: the broker redelivered the
    # message, or the job has written no progress for EDITOR_STALE_RUNNING_S. A duplicate message of a
    # job that is running elsewhere is otherwise a no-op.
    silent_before = timezone.now() - timedelta(seconds=settings.EDITOR_STALE_RUNNING_S)
    if not jobstate.claim(job.pk, worker=worker, allow_restart=redelivered, silent_before=silent_before):
        logger.info("job %s could not be claimed (status %s); skipping", job_id, job.status)
        return
    if job.status == JobStatus.RUNNING:
        logger.warning("job %s restarts after an interrupted attempt on %s", job_id, job.worker or "a worker")

    try:
        try:
            run_claimed_job(job, worker=worker, soft_time_limit_s=soft_time_limit_s)
        finally:
            worker_state.finish_job(str(job.pk))
            worker_state.publish(worker)
            residency.record_evictions(worker)
    except DatabaseError as error:
        # The connection dropped (or the database restarted) mid-job. Closing it lets the next attempt
        # reconnect, and the task re-sends the job as a takeover. If that fails too, the reconciler
        # re-sends the job once it has been stale for EDITOR_STALE_RUNNING_S.
        logger.warning("job %s lost its database connection (%s); handing it back for another attempt", job_id, error)
        connection.close()
        raise DatabaseConnectionLost(f"job {job_id}: {type(error).__name__}: {error}") from error


def run_claimed_job(job: EditJob, *, worker: str, soft_time_limit_s: float | None) -> None:
    """Run a job this worker has claimed and store its outcome; database errors propagate."""
    job_id = str(job.pk)
    timings: dict[str, float] = {}
    try:
        limit_s = soft_time_limit_s or settings.EDITOR_JOB_SOFT_TIME_LIMIT_S
        result, decision = run_job_shrinking_on_oom(
            job, timings, worker=worker, deadline=time.monotonic() + limit_s
        )
        start = time.perf_counter()
        png = imaging.encode_png(result.image)
        try:
            stored = job.result.storage.save(f"results/{uuid.uuid4().hex}.png", ContentFile(png))
        except OSError as error:
            logger.error("job %s: storing its result failed: %s", job_id, error)
            jobstate.fail(job.pk, failure=storage_failure(error), timings=timings)
            return
        timings["store"] = (time.perf_counter() - start) * 1000
    except JobCancelled:
        jobstate.finish_cancelled(job.pk, timings=timings)
        phases = " ".join(f"{phase}={ms:.0f}ms" for phase, ms in timings.items())
        logger.info("job %s cancelled while running (%s)", job_id, phases or "before its first phase ended")
        return
    except DatabaseError:
        raise
    except SoftTimeLimitExceeded:
        limit = soft_time_limit_s or settings.EDITOR_JOB_SOFT_TIME_LIMIT_S
        logger.error("job %s exceeded the soft time limit of %g s", job_id, limit)
        jobstate.fail(job.pk, failure=Failure("timed_out", {"limit": f"{limit:g}"}), timings=timings)
        return
    except JobOutOfMemory as error:
        logger.error("job %s: %s", job_id, error)
        jobstate.fail(job.pk, failure=error.failure, timings=timings)
        return
    except Exception as error:  # noqa: BLE001 - any failure ends this job, never the worker
        logger.exception("job %s failed", job_id)
        jobstate.fail(job.pk, failure=exception_failure("edit_error", error), timings=timings)
        return

    details = {
        "cache_outcome": decision.outcome,
        "cache_variant": decision.key.variant if decision.key else "",
        "cache_key": decision.key.digest() if decision.key else "",
        "flop_fraction": decision.flop_fraction,
    }
    try:
        won = jobstate.succeed(job.pk, result_name=stored, timings=timings, details=details)
    except DatabaseError:
        discard_unrecorded_result(job, stored)
        raise
    if not won:
        # Cancelled or finished by another attempt meanwhile: keep exactly one stored result.
        job.result.storage.delete(stored)
        logger.info("job %s finished elsewhere; discarded this attempt's result", job_id)
        return
    publish_metrics(worker)
    if decision.queue_warmup:
        warmups.request_warmup(
            job.template, seed=job.seed, steps=job.steps, guidance=job.guidance, model=job.model or None
        )
    logger.info(
        "job %s succeeded on %s (cache %s, %.0f%% of full FLOPs): %s",
        job_id, worker, decision.outcome, decision.flop_fraction * 100,
        " ".join(f"{phase}={ms:.0f}ms" for phase, ms in timings.items()),
    )


def run_job_shrinking_on_oom(job: EditJob, timings: dict[str, float], *, worker: str, deadline: float | None = None):
    """Run the job; after an out-of-memory error retry once at a quarter of the working pixels.

    Raises JobOutOfMemory when the retry runs out of memory too.
    """
    runner_settings = RunnerSettings.from_env()
    oom_errors = out_of_memory_errors()
    try:
        return run_job(job, timings, runner_settings, worker=worker, deadline=deadline)
    except oom_errors as error:
        smaller = replace(
            runner_settings,
            max_work_pixels=max(MIN_WORK_PIXELS, runner_settings.max_work_pixels // OOM_SHRINK_FACTOR),
        )
        logger.warning(
            "job %s ran out of memory at %d working pixels (%s: %s); retrying at %d",
            job.pk, runner_settings.max_work_pixels, type(error).__name__, error, smaller.max_work_pixels,
        )
    release_accelerator_memory()
    timings.clear()
    try:
        return run_job(job, timings, smaller, worker=worker, deadline=deadline)
    except oom_errors as error:
        release_accelerator_memory()
        raise JobOutOfMemory(
            Failure(
                "out_of_memory",
                {"pixels": runner_settings.max_work_pixels, "smaller": smaller.max_work_pixels,
                 "detail": type(error).__name__},
            )
        ) from error


def worker_cost_model(model, worker: str, runner_settings: RunnerSettings):
    """Return this worker's cost model of `model`, loaded or created (calibrating in the background) on first use."""
    return worker_state.cost_model(
        model, hostname=worker, text_tokens=model.family.text_tokens(model.pipe, runner_settings.max_sequence_length),
        max_sequence_length=runner_settings.max_sequence_length,
    )


def run_job(
    job: EditJob, timings: dict[str, float], runner_settings: RunnerSettings | None = None, *, worker: str,
    deadline: float | None = None,
):
    """Read the job's inputs, pick the cache path and run the edit; fills ``timings`` in place."""
    runner_settings = runner_settings or RunnerSettings.from_env()
    start = time.perf_counter()
    image, mask = read_inputs(job)
    model = get_model(job.model or None)
    timings["load"] = (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    template = caching.working_template(model, image, runner_settings)
    inputs = prepare_working_inputs(image, mask, runner_settings.max_work_pixels, model.working_multiple)
    variant = model_cache_variant(model)
    key = caching.job_cache_key(
        model, inputs, template_hash=job.template.content_hash, steps=job.steps, seed=job.seed,
        guidance=job.guidance, variant=variant, settings=runner_settings,
    )
    # With the cache switched off a fraction of 1.0 makes the decision a bypass: stock computation.
    fraction = (
        caching.masked_flop_fraction(model, inputs, variant=variant, settings=runner_settings)
        if settings.EDITOR_CACHE_ENABLED else 1.0
    )
    tier_before = get_store().tier_of(key)
    decision = caching.decide(
        model, key, fraction, pending_same_key=pending_jobs_like(job),
        cache_valid=warmups.cache_is_valid(key.digest()),
        counts=caching.token_counts(model, inputs, runner_settings),
    )
    timings["cache_lookup"] = (time.perf_counter() - start) * 1000
    prefetch_for_waiting_jobs(model, job, runner_settings)
    counts = caching.token_counts(model, inputs, runner_settings)
    costs = worker_cost_model(model, worker, runner_settings)
    computed = counts.text + (counts.masked if decision.activations is not None else counts.image)
    if decision.outcome == CacheOutcome.HIT and tier_before == "disk":
        costs.record_load(get_store().disk.entry_nbytes_of(key) or 0, timings["cache_lookup"] / 1000)
    if decision.key is not None and decision.outcome == CacheOutcome.HIT:
        worker_state.remember_cache(model.name, key)
    # On a batching worker the job's steps also carry the tokens of the jobs already running here.
    shared = worker_state.running_tokens() if settings.EDITOR_ENGINE_MAX_BATCH > 1 else 0.0
    predicted = job.steps * costs.fit.step_seconds(computed + shared)
    if decision.outcome == CacheOutcome.MISS_WARM_FIRST:
        predicted += job.steps * costs.fit.step_seconds(counts.text + counts.image)
    worker_state.start_job(str(job.pk), time.time() + predicted, computed)
    worker_state.publish(worker)

    activations = decision.activations
    edit_progress = StepReporter(job.pk, deadline=deadline)
    if decision.outcome == CacheOutcome.MISS_WARM_FIRST:
        warm_progress = StepReporter(job.pk, span=0.5, deadline=deadline)
        outcome = caching.warm_template(
            model, template, key, settings=runner_settings, on_step=warm_progress,
            keep_alive=warm_progress.keep_alive,
        )
        timings.update(outcome.timings_ms)
        activations = outcome.activations
        warmups.record_inline_warmup(
            job.template, seed=job.seed, steps=job.steps, guidance=job.guidance, variant=variant, model=model.name,
            cache_key=key.digest(), cache_bytes=outcome.nbytes, tier=outcome.tier, timings=outcome.timings_ms,
            worker=worker,
        )
        edit_progress = StepReporter(job.pk, start=0.5, span=0.5, deadline=deadline)

    request = EditRequest(
        image=image, mask=mask, prompt=job.prompt, seed=job.seed, steps=job.steps, guidance=job.guidance
    )
    start = time.perf_counter()
    try:
        result = run_edit(
            model, request, on_step=edit_progress, settings=runner_settings, activations=activations,
            block_source=decision.streamed.source if decision.streamed else None,
            full_prefix_blocks=decision.full_prefix_blocks, keep_alive=edit_progress.keep_alive,
        )
    except JobCancelled:
        # The edit's own phases are not split up to the step it stopped at, so its time counts as one.
        timings["edit_until_cancel"] = (time.perf_counter() - start) * 1000
        raise
    finally:
        decision.close()
    timings.update(result.timings_ms)
    caching.record_timings(model, decision, counts, steps=job.steps, timings_ms=result.timings_ms)
    # Masked steps in the batching engine feed the cost model per engine step (`batching.record_step_cost`).
    in_engine = (
        activations is not None and not decision.full_prefix_blocks and batching.batching_enabled(model)
    )
    if decision.outcome != CacheOutcome.MISS_WARM_FIRST and result.timings_ms.get("denoise") and not in_engine:
        costs.record_step(computed + shared, result.timings_ms["denoise"] / 1000 / job.steps)
    if decision.outcome == CacheOutcome.MISS_WARM_FIRST:
        worker_state.remember_cache(model.name, key)
    return result, decision


def reuse_cached_warmup(warmup: CacheWarmup, key: CacheKey) -> bool:
    """Finish `warmup` without computing when this worker's cache already contains a valid entry for `key`.

    The key covers the template's content, so a second upload of the same image, or a repeated warm-up
    request, would compute the same activations again.
    """
    started = time.perf_counter()
    cache_bytes = warmups.vouched_cache_bytes(key.digest())
    tier = get_store().tier_of(key) if cache_bytes is not None else None
    if tier is None:
        return False
    logger.info(
        "warm-up %s of template %s: cache %s is already in %s; reusing it", warmup.pk, warmup.template_id,
        key.short(), tier,
    )
    warmups.succeed(
        warmup.pk, cache_key=key.digest(), cache_bytes=cache_bytes or 0, tier=tier,
        timings={"cache_lookup": (time.perf_counter() - started) * 1000},
    )
    return True


def execute_warmup(warmup_id: int, *, worker: str) -> None:
    close_old_connections()
    warmup = CacheWarmup.objects.select_related("template").filter(pk=warmup_id).first()
    if warmup is None or warmup.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        logger.info("warm-up %s is gone or finished; skipping", warmup_id)
        return
    waiting = warmups.queued_jobs_to_yield_to(warmup) if warmup.status == JobStatus.QUEUED else 0
    if waiting:
        logger.info(
            "warm-up %s of template %s yields to %d queued edit jobs; sent back for %d s",
            warmup.pk, warmup.template_id, waiting, settings.EDITOR_WARMUP_DEFER_S,
        )
        warmups.enqueue_warmup(warmup, countdown=settings.EDITOR_WARMUP_DEFER_S)
        return
    if not warmups.claim(warmup.pk, worker=worker):
        return
    try:
        runner_settings = RunnerSettings.from_env()
        image = read_png(warmup.template.image)
        model = get_model(warmup.model or None)
        # A worker that has only warmed so far still publishes a fit, so the cost policy can route to it.
        worker_cost_model(model, worker, runner_settings)
        worker_state.publish(worker)
        template = caching.working_template(model, image, runner_settings)
        key = caching.job_cache_key(
            model, template, template_hash=warmup.template.content_hash, steps=warmup.steps,
            seed=warmup.seed, guidance=warmup.guidance, variant=warmup.variant, settings=runner_settings,
        )
        if reuse_cached_warmup(warmup, key):
            return

        progress = [0.0]

        def report(done: int, total: int) -> None:
            progress[0] = min(done / max(total, 1), 0.99)
            warmups.report_progress(warmup.pk, progress[0])

        outcome = caching.warm_template(
            model, template, key, settings=runner_settings, on_step=report,
            keep_alive=lambda: warmups.report_progress(warmup.pk, progress[0]),
        )
    except Exception as error:  # noqa: BLE001 - a failed warm-up only costs later jobs their cache hit
        logger.exception("warm-up %s of template %s failed", warmup_id, warmup.template_id)
        warmups.fail(warmup.pk, failure=exception_failure("warmup_error", error, template=warmup.template_id))
        return
    worker_state.remember_cache(model.name, key)
    publish_metrics(worker)
    worker_state.publish(worker)
    residency.record_evictions(worker)
    warmups.succeed(
        warmup.pk, cache_key=outcome.key.digest(), cache_bytes=outcome.nbytes, tier=outcome.tier,
        timings=outcome.timings_ms,
    )
