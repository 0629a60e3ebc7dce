"""Running one edit job: claim it, read its files, run the model, store the result.

The database row is the source of truth. Each step re-checks the job's state, so a job cancelled,
finished elsewhere or deleted while it waited is skipped without error.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
from django.core.files.base import ContentFile
from django.db import close_old_connections

from editing import imaging, jobstate
from editing.models import EditJob, JobStatus
from workers.model_loading import get_model
from workers.runner import EditRequest, JobCancelled, run_edit

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Progress is written at most this often, so a fast model does not flood the database.
PROGRESS_MIN_INTERVAL_S = 0.2


class StepReporter:
    """Stores per-step progress and raises ``JobCancelled`` once a cancel was requested."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.job_id = job_id
        self.last_write = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_write < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_write = now
        # The last step is reported as 99%: decoding and storing still follow.
        fraction = min(done / max(total, 1), 0.99)
        if not jobstate.report_progress(self.job_id, fraction) or jobstate.is_cancel_requested(self.job_id):
            raise JobCancelled(f"job {self.job_id} was cancelled at step {done}/{total}")


def read_inputs(job: EditJob) -> tuple[np.ndarray, np.ndarray]:
    with job.template.image.open("rb") as handle:
        image = imaging.decode_png(handle.read())
    with job.mask.open("rb") as handle:
        mask = imaging.decode_png(handle.read())
    if mask.ndim == 3:
        mask = mask[..., 0]
    return image, mask > 127


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
    if not jobstate.claim(job.pk, worker=worker, allow_restart=True):
        logger.info("job %s could not be claimed (status %s); skipping", job_id, job.status)
        return
    if job.status == JobStatus.RUNNING or redelivered:
        logger.warning("job %s restarts after an interrupted attempt", job_id)

    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        image, mask = read_inputs(job)
        model = get_model()
        timings["load"] = (time.perf_counter() - start) * 1000

        request = EditRequest(
            image=image, mask=mask, prompt=job.prompt, seed=job.seed, steps=job.steps, guidance=job.guidance
        )
        result = run_edit(model, request, on_step=StepReporter(job.pk))
        timings.update(result.timings_ms)

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
    logger.info(
        "job %s succeeded on %s: %s",
        job_id, worker, " ".join(f"{phase}={ms:.0f}ms" for phase, ms in timings.items()),
    )
