"""Creating templates and edit jobs, and handing jobs to the queue.

Input validation happens in the API serializers; these functions take already-decoded pixels.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import F

from editing import catalog, cost_routing, fleet, imaging, jobstate
from editing.params import check_generation
from editing.models import EditJob, JobStatus, Template
from editing.routing import bucket_for
from editor_site.celery import app as celery_app

logger = logging.getLogger(__name__)

RUN_EDIT_TASK = "workers.tasks.run_edit_job"


def content_hash(image: np.ndarray) -> str:
    """Hash the upright 8-bit RGB pixels with their shape, so equal content gives equal hashes."""
    digest = hashlib.sha256()
    digest.update(f"{image.shape[1]}x{image.shape[0]}x{image.shape[2]}:".encode())
    digest.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def create_template(*, owner, name: str, image: np.ndarray, model: str = "") -> Template:
    """Store a template as the upright 8-bit RGB PNG that every job will read.

    `model` (a served model's name, default the deployment's default model) is the model its warm-up
    and the jobs that name no model use.
    """
    height, width = image.shape[:2]
    template = Template(
        owner=owner, name=name, width=width, height=height, content_hash=content_hash(image),
        model=model or catalog.default_model().name,
    )
    template.image.save(f"{uuid.uuid4().hex}.png", ContentFile(imaging.encode_png(image)), save=False)
    # The template and its warm-up commit together, so a failure leaves neither alone. The warm-up is sent
    # after the commit.
    with transaction.atomic():
        template.save()
        if settings.EDITOR_WARMUP_ON_CREATE:
            from editing.warmups import request_warmup

            request_warmup(template, requested_by=owner)
    logger.info("template %s created for user %s: %dx%d", template.pk, owner.pk, width, height)
    return template


def token_mask_ratio(mask: np.ndarray, model: catalog.ModelSpec | None = None) -> float:
    """Fraction of the model's image tokens that the mask touches, after dilation."""
    patch = (model or catalog.default_model()).facts.pixels_per_token
    return imaging.mask_ratio(mask, patch=patch, dilation=settings.EDITOR_MASK_DILATION_TOKENS)


def job_model(template: Template, requested: str | None) -> catalog.ModelSpec:
    """The model a job runs on: the requested one, else the template's, else the default model."""
    spec = catalog.get(requested or template.model)
    return spec if spec is not None else catalog.default_model()


def queue_for_mask(mask: np.ndarray, model: catalog.ModelSpec | None = None) -> str:
    spec = model or catalog.default_model()
    return bucket_for(token_mask_ratio(mask, spec)).queue(spec.name)


def submit_job(
    *,
    owner,
    template: Template,
    mask: np.ndarray,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    model: str | None = None,
) -> EditJob:
    """Create a queued job and enqueue it on its model's bucket queue once the row is committed.

    `model` must be a served model's name (the API checks it); None takes the template's model.
    """
    check_generation(seed=seed, steps=steps, guidance=guidance)
    spec = job_model(template, model)
    ratio = token_mask_ratio(mask, spec)
    bucket = bucket_for(ratio)
    mask_png = imaging.encode_png(mask.astype(np.uint8) * 255)
    with transaction.atomic():
        job = EditJob(
            owner=owner,
            template=template,
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            model=spec.name,
            mask_ratio=ratio,
            bucket=bucket.name,
        )
        chosen = pick_queue(job)
        job.mask.save(f"{uuid.uuid4().hex}.png", ContentFile(mask_png), save=False)
        job.save()
        Template.objects.filter(pk=template.pk).update(use_count=F("use_count") + 1)
        transaction.on_commit(lambda: enqueue(job, chosen))
    logger.info(
        "job %s submitted by user %s: template %s, mask ratio %.3f, queue %s",
        job.pk, owner.pk, template.pk, ratio, job.queue_name,
    )
    return job


def pick_queue(job: EditJob) -> cost_routing.Candidate | None:
    """Set `job.queue_name` by EDITOR_ROUTING: its bucket queue, or the worker the cost policy picks.

    Returns the cost policy's pick (None under the bucket policy or when no worker's cost is known).
    """
    chosen = None
    if settings.EDITOR_ROUTING == "cost":
        chosen = cost_routing.choose(cost_routing.JobShape(
            model=job.model, template_hash=job.template.content_hash, width=job.template.width,
            height=job.template.height, mask_ratio=job.mask_ratio, steps=job.steps, seed=job.seed,
            guidance=job.guidance,
        ))
    job.queue_name = chosen.queue if chosen else bucket_for(job.mask_ratio).queue(job.model)
    return chosen


def reroute(job: EditJob) -> None:
    """Route a queued job again (its worker is gone) and send it; a cancelled or started job is left alone."""
    chosen = pick_queue(job)
    if EditJob.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(queue_name=job.queue_name) == 1:
        logger.info("job %s re-routed to %s", job.pk, job.queue_name)
        enqueue(job, chosen)


def enqueue(job: EditJob, chosen: cost_routing.Candidate | None = None, *, takeover: bool = False) -> None:
    """Send the job's message; a broker failure leaves the job queued for the reconciler.

    With `takeover` the receiving worker may restart the job although its row still reads `running`.
    """
    if chosen is not None:
        cost_routing.add_to_backlog(chosen, str(job.pk))
    if not celery_app.conf.broker_url:
        logger.error("no broker is configured (set REDIS_URL); job %s stays queued", job.pk)
        return
    try:
        options = {"kwargs": {"takeover": True}} if takeover else {}
        celery_app.send_task(RUN_EDIT_TASK, args=[str(job.pk)], queue=job.queue_name, **options)
    except Exception:  # noqa: BLE001 - any broker error; the job row stays queued and is retried later
        logger.exception("could not enqueue job %s on %s; it stays queued", job.pk, job.queue_name)


def cancel_job(job: EditJob) -> bool:
    """Cancel a queued job at once, or ask a running one to stop at its next step.

    Returns False when the job had already finished.
    """
    if jobstate.cancel_queued(job.pk):
        logger.info("job %s cancelled while queued", job.pk)
        return True
    if jobstate.request_cancel_running(job.pk):
        # Read the claim afresh: another worker may have taken the job over since `job` was loaded.
        claim = EditJob.objects.filter(pk=job.pk).values("worker", "started_at").first() or {}
        worker, started_at = claim.get("worker"), claim.get("started_at")
        if worker and started_at and fleet.process_gone(worker, started_at.timestamp()):
            # No process runs the job any more (its worker stopped or restarted), so none would stop it.
            jobstate.finish_cancelled(job.pk)
            logger.info("job %s cancelled; its worker %s no longer runs it", job.pk, worker)
            return True
        logger.info("job %s asked to stop at its next step", job.pk)
        return True
    return False


def queue_position(job: EditJob) -> int | None:
    """Number of jobs ahead of this one in its queue; None unless the job is queued."""
    if job.status != JobStatus.QUEUED:
        return None
    return EditJob.objects.filter(
        queue_name=job.queue_name, status=JobStatus.QUEUED, created_at__lt=job.created_at
    ).count()
