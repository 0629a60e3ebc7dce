"""Browser pages: the mask editor, the job history and the stored mask of a past job.

The pages only render HTML and settings. Everything they do with templates and jobs goes through
the REST API from the browser (session cookie plus CSRF token), the same API that other clients use.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.text import capfirst
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from editing import catalog
from editing.api.serializers import JobSerializer
from editing.models import CacheOutcome, CacheVariant, EditJob, JobStatus
from editing.warmups import DEFAULT_GUIDANCE

logger = logging.getLogger(__name__)

HISTORY_PAGE_SIZE = 20
# Job fields describing the activation cache, shown when the job API returns them.
CACHE_FIELDS = ("cache_used", "cache_outcome", "cache_variant", "flop_fraction")

# Worker phases in pipeline order, as keys of a job's timings (milliseconds per phase).
PHASE_LABELS = {
    "load": gettext_lazy("load"),
    "cache_lookup": gettext_lazy("cache lookup"),
    "warmup": gettext_lazy("cache warm-up"),
    "cache_store": gettext_lazy("cache store"),
    "preprocess": gettext_lazy("preprocess"),
    "denoise": gettext_lazy("denoise"),
    "decode": gettext_lazy("decode"),
    "composite": gettext_lazy("composite"),
    "store": gettext_lazy("store"),
    # A running job cancelled during its edit: the time from the edit's start to the step it stopped at.
    "edit_until_cancel": gettext_lazy("edit until cancelled"),
}


@dataclass(frozen=True)
class PhaseTiming:
    phase: str
    label: str
    milliseconds: float
    text: str  # "850 ms" or "3.4 s"


@dataclass(frozen=True)
class JobPrefill:
    """Settings of an earlier job that the editor loads for a re-run."""

    job_id: str
    template_id: int
    prompt: str
    seed: int
    steps: int
    guidance: float
    mask_url: str
    model: str = ""


# Stands for a job id in URL patterns that the editor's JavaScript fills in.
JOB_ID_PLACEHOLDER = uuid.UUID(int=0)


@dataclass(frozen=True)
class EditorConfig:
    """Limits and defaults that the editor's JavaScript reads from the page."""

    default_steps: int
    max_steps: int
    default_seed: int
    default_guidance: float
    max_prompt_chars: int
    max_upload_bytes: int
    max_pixels: int
    templates_url: str
    jobs_url: str
    job_mask_url: str  # the mask of job {id}
    phases: list[str]  # timing keys in pipeline order
    prefill: JobPrefill | None = None


@dataclass(frozen=True)
class CacheInfo:
    label: str
    value: str


@dataclass(frozen=True)
class HistoryRow:
    job_id: str
    status: str
    status_label: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    mask_ratio: float
    mask_percent: str  # mask_ratio as a percentage with one decimal, "12.5"
    bucket: str
    template_id: int
    template_name: str
    template_image_url: str
    result_url: str | None
    error: str
    created_at: object  # datetime, formatted by the template in the active language
    timings: list[PhaseTiming]
    total_text: str
    cache: list[CacheInfo] = field(default_factory=list)
    rerun_url: str = ""


def duration_messages() -> dict[str, str]:
    return {"duration_ms": _("%(value)s ms"), "duration_s": _("%(value)s s")}


def format_milliseconds(milliseconds: float) -> str:
    """Format a duration as "850 ms" below one second and "3.4 s" from one second up."""
    messages = duration_messages()
    if round(milliseconds) < 1000:
        return messages["duration_ms"] % {"value": round(milliseconds)}
    return messages["duration_s"] % {"value": f"{milliseconds / 1000:.1f}"}


def phase_timings(timings: dict[str, float] | None) -> list[PhaseTiming]:
    """Turn a job's {phase: milliseconds} map into labelled rows, in pipeline order."""
    if not timings:
        return []
    known = [phase for phase in PHASE_LABELS if phase in timings]
    extra = sorted(phase for phase in timings if phase not in PHASE_LABELS)
    rows = []
    for phase in known + extra:
        try:
            milliseconds = float(timings[phase])
        except (TypeError, ValueError):
            logger.warning("timing %r=%r is not a number; it is left out", phase, timings[phase])
            continue
        label = str(PHASE_LABELS.get(phase, phase))
        rows.append(PhaseTiming(phase, label, milliseconds, format_milliseconds(milliseconds)))
    return rows


def total_text(rows: list[PhaseTiming]) -> str:
    if not rows:
        return ""
    return format_milliseconds(sum(row.milliseconds for row in rows))


def cache_labels() -> dict[str, str]:
    labels = {
        "cache_used": _("cache used"),
        "cache_outcome": _("cache outcome"),
        "cache_variant": _("cache variant"),
        "flop_fraction": _("computed FLOPs"),
    }
    return {name: capfirst(label) for name, label in labels.items()}


CACHE_VARIANT_LABELS = dict(CacheVariant.choices)


def cache_variant_label(variant: str) -> str:
    """Return the translated name of a cache variant, or an unknown value as it is."""
    return str(CACHE_VARIANT_LABELS.get(variant, variant))


def cache_outcome_label(outcome: str) -> str:
    """Return the translated description of a cache outcome, or an unknown value as it is."""
    try:
        return str(CacheOutcome(outcome).label)
    except ValueError:
        return outcome


def cache_info(data: dict) -> list[CacheInfo]:
    """Describe the cache fields of a job as the API returns it; empty when it has none."""
    labels = cache_labels()
    info = []
    for name in CACHE_FIELDS:
        value = data.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            text = _("yes") if value else _("no")
        elif name == "cache_outcome":
            text = cache_outcome_label(str(value))
        elif name == "cache_variant":
            text = cache_variant_label(str(value))
        elif name == "flop_fraction":
            text = _("%(percent)s%% of a full run") % {"percent": f"{float(value) * 100:.1f}"}
        else:
            text = str(value)
        info.append(CacheInfo(labels[name], text))
    return info


def job_prefill(request: HttpRequest, job_id: str | None) -> JobPrefill | None:
    """Load the settings of one of the user's jobs, or None when the id is missing or unknown."""
    if not job_id:
        return None
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        return None
    job = EditJob.objects.filter(pk=key, owner=request.user).first()
    if job is None:
        return None
    return JobPrefill(
        job_id=str(job.pk),
        template_id=job.template_id,
        prompt=job.prompt,
        seed=job.seed,
        steps=job.steps,
        guidance=job.guidance,
        mask_url=reverse("job-mask", args=[job.pk]),
        model=job.model,
    )


def other_active_jobs_message(count: int) -> str:
    """Return the notice about queued or running jobs besides the one in the progress panel, unformatted."""
    return ngettext(
        "%(count)s more job is queued or running.", "%(count)s more jobs are queued or running.", count
    )


def browser_messages() -> dict[str, str]:
    """Translated strings used by the editor's JavaScript; %(name)s placeholders are filled there."""
    messages = {
        f"status_{status.value}": str(status.label) for status in JobStatus
    }
    messages.update(
        {
            "loading_templates": _("Loading templates…"),
            "no_templates": _("No templates yet. Upload a photo to start."),
            "template_size": _("%(width)s × %(height)s px"),
            "template_selected": _("Selected template: %(name)s"),
            "template_missing": _("Template %(id)s of that job is no longer available; pick another one."),
            "uploading": _("Uploading…"),
            "uploaded": _("Uploaded %(name)s."),
            "no_file": _("Choose an image file to upload."),
            "no_file_chosen": _("No file chosen"),
            "no_template": _("Pick or upload a template first."),
            "empty_mask": _("The mask is empty. Paint the area to edit first."),
            "mask_coverage": _("The mask covers %(percent)s%% of the image."),
            "mask_loaded": _("Loaded the mask of the earlier job."),
            "mask_load_failed": _("The mask of the earlier job could not be loaded; paint a new one."),
            "image_load_failed": _("The template image could not be loaded."),
            "zoom_level": _("%(percent)s%%"),
            "submitting": _("Submitting…"),
            "queue_position": _("%(position)s jobs ahead in the queue"),
            "queue_next": _("Next in the queue"),
            "queue_one_ahead": _("1 job ahead in the queue"),
            "bad_number": _("%(field)s: this is not a number. Enter a number from %(min)s to %(max)s."),
            "step_of": _("Step %(step)s of %(steps)s"),
            "estimating": _("Estimating the time left…"),
            "time_left_seconds": _("About %(seconds)s s left"),
            "time_left_minutes": _("About %(minutes)s min left"),
            "cancel_requested": _("Cancel requested; the job stops after its current step."),
            "job_failed": _("The job failed: %(error)s"),
            "job_cancelled": _("The job was cancelled."),
            "job_succeeded": _("The edit is ready."),
            "network_error": _("The server could not be reached; retrying…"),
            "session_ended": _("Your session has ended. Log in again in a new tab, then try again. Your mask stays in this tab."),
            "log_in_again": _("Log in (opens a new tab)"),
            "job_lost": _("This job no longer exists, for example because its template was deleted. Start a new edit."),
            "job_lost_status": _("not found"),
            "active_job_loaded": _("The form shows job %(id)s, which is still running: its mask, prompt and settings."),
            "queued_job_loaded": _("The form shows job %(id)s, which is still queued: its mask, prompt and settings."),
            # The script picks the first form for a count of 1 and the second for other counts, which is the
            # plural rule of English; Japanese has one form for every count.
            "other_active_jobs_one": other_active_jobs_message(1),
            "other_active_jobs_other": other_active_jobs_message(2),
            "prompt_count": _("%(count)s / %(max)s"),
            "prompt_at_limit": _("The prompt has reached the limit of %(max)s characters."),
            "request_failed": _("The request failed with HTTP status %(status)s."),
            "field_error": _("%(field)s: %(message)s"),
            "total": _("total"),
            "yes": _("yes"),
            "no": _("no"),
        }
    )
    messages.update({f"phase_{phase}": str(label) for phase, label in PHASE_LABELS.items()})
    messages.update(duration_messages())
    messages.update(cache_labels())
    messages.update({f"cache_outcome_{outcome.value}": str(outcome.label) for outcome in CacheOutcome})
    messages.update({f"cache_variant_{name}": str(label) for name, label in CACHE_VARIANT_LABELS.items()})
    messages["flop_fraction_value"] = _("%(percent)s%% of a full run")
    return messages


@login_required
def editor(request: HttpRequest) -> HttpResponse:
    """Render the editor; ``?job=<id>`` preloads template, mask, prompt and settings of that job."""
    config = EditorConfig(
        default_steps=settings.EDITOR_DEFAULT_STEPS,
        max_steps=settings.EDITOR_MAX_STEPS,
        default_seed=settings.EDITOR_DEFAULT_SEED,
        default_guidance=DEFAULT_GUIDANCE,
        max_prompt_chars=settings.EDITOR_MAX_PROMPT_CHARS,
        max_upload_bytes=settings.EDITOR_MAX_UPLOAD_BYTES,
        max_pixels=settings.EDITOR_MAX_PIXELS,
        templates_url=reverse("template-list"),
        jobs_url=reverse("job-list"),
        job_mask_url=reverse("job-mask", args=[JOB_ID_PLACEHOLDER]).replace(str(JOB_ID_PLACEHOLDER), "{id}"),
        phases=list(PHASE_LABELS),
        prefill=job_prefill(request, request.GET.get("job")),
    )
    requested_job = request.GET.get("job")
    context = {
        "config": asdict(config),
        "messages_for_script": browser_messages(),
        "prefill": config.prefill,
        # An "Edit again" link to a job that is gone (deleted with its template) or belongs to another user.
        "prefill_missing": requested_job if requested_job and config.prefill is None else None,
        # A choice only where there is one: with a single served model the field is left out.
        "models": [
            {"name": spec.name, "label": spec.facts.label} for spec in catalog.models()
        ] if len(catalog.models()) > 1 else [],
    }
    return render(request, "editing/editor.html", context)


def history_row(job: EditJob) -> HistoryRow:
    data = JobSerializer(job).data
    timings = phase_timings(job.timings)
    return HistoryRow(
        job_id=str(job.pk),
        status=job.status,
        status_label=job.get_status_display(),
        prompt=job.prompt,
        seed=job.seed,
        steps=job.steps,
        guidance=job.guidance,
        mask_ratio=job.mask_ratio,
        mask_percent=f"{job.mask_ratio * 100:.1f}",
        bucket=job.bucket,
        template_id=job.template_id,
        template_name=job.template.name,
        template_image_url=reverse("template-image", args=[job.template_id]),
        result_url=data.get("result_url"),
        error=job.error_text,
        created_at=job.created_at,
        timings=timings,
        total_text=total_text(timings),
        cache=cache_info(data),
        rerun_url=f"{reverse('editor')}?job={job.pk}",
    )


@login_required
def history(request: HttpRequest) -> HttpResponse:
    """List the user's jobs, newest first, with results, timings and cache use."""
    jobs = EditJob.objects.filter(owner=request.user).select_related("template").order_by("-created_at")
    page = Paginator(jobs, HISTORY_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [history_row(job) for job in page.object_list]
    return render(request, "editing/history.html", {"page": page, "rows": rows})


@login_required
def job_mask(request: HttpRequest, job_id: uuid.UUID) -> FileResponse:
    """Return the stored mask PNG of one of the user's jobs (white = edited), for re-runs."""
    job = EditJob.objects.filter(pk=job_id, owner=request.user).first()
    if job is None or not job.mask:
        raise Http404(_("Job %(id)s was not found among your jobs.") % {"id": job_id})
    try:
        handle = job.mask.open("rb")
    except FileNotFoundError:
        logger.error("stored mask %s of job %s is missing", job.mask.name, job.pk)
        raise Http404(_("The mask of job %(id)s is missing from storage.") % {"id": job_id}) from None
    return FileResponse(handle, content_type="image/png", filename=f"mask-{job.pk}.png")
