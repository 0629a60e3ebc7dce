"""Admin pages for templates, edit jobs and cache warm-ups.

Stored images are private to their owners and the API serves them to owners only, so the admin
serves its own thumbnails through views that require staff access to the object.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, Max, Q, QuerySet
from django.http import FileResponse, Http404, HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from editing import services, warmups
from editing.models import ACTIVE_STATUSES, CacheOutcome, CacheWarmup, EditJob, Template
from editing.pages import cache_outcome_label, cache_variant_label, phase_timings, total_text

THUMBNAIL_LIST_PX = 96
THUMBNAIL_DETAIL_PX = 480


def image_response(field_file, *, filename: str) -> FileResponse:
    if not field_file:
        raise Http404(_("There is no stored image."))
    try:
        handle = field_file.open("rb")
    except FileNotFoundError:
        raise Http404(_("The stored image %(name)s is missing.") % {"name": field_file.name}) from None
    return FileResponse(handle, content_type="image/png", filename=filename)


def thumbnail(url: str, alt: str, *, width: int, height: int, box_px: int) -> str:
    """Build an <img> tag for an image of `width` x `height` pixels, scaled down to fit a `box_px` square."""
    scale = min(1.0, box_px / max(width, height, 1))
    return format_html(
        '<img src="{}" alt="{}" width="{}" height="{}" loading="lazy">',
        url, alt, max(1, round(width * scale)), max(1, round(height * scale)),
    )


def timings_table(timings: dict | None) -> str:
    """Render per-phase timings as an HTML table, pipeline order first, with the total."""
    rows = phase_timings(timings)
    if not rows:
        return "—"
    body = format_html_join("", "<tr><th scope=\"row\">{}</th><td>{}</td></tr>", ((row.label, row.text) for row in rows))
    return format_html(
        '<table class="phase-timings"><tbody>{}<tr><th scope="row">{}</th><td><strong>{}</strong></td></tr></tbody></table>',
        body, _("total"), total_text(rows),
    )


def timings_summary(timings: dict | None) -> str:
    """Summarize timings in one line for list pages: the slowest phase and the total."""
    rows = phase_timings(timings)
    if not rows:
        return "—"
    slowest = max(rows, key=lambda row: row.milliseconds)
    return _("%(phase)s %(duration)s · total %(total)s") % {
        "phase": slowest.label, "duration": slowest.text, "total": total_text(rows),
    }


@admin.display(description=gettext_lazy("error"))
def error_reason(row: EditJob | CacheWarmup) -> str:
    """Return why the job or warm-up failed, in the admin user's language."""
    return row.error_text


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = [
        "id", "thumbnail_list", "name", "owner", "model", "size", "use_count", "cache_state", "cache_hits",
        "created_at",
    ]
    list_display_links = ["id", "thumbnail_list", "name"]
    list_filter = ["owner", "model"]
    search_fields = ["name", "content_hash"]
    readonly_fields = [
        "thumbnail_detail", "model", "size", "width", "height", "content_hash", "use_count", "cache_state",
        "cache_hits", "last_cache_hit", "created_at", "updated_at",
    ]
    fields = [
        "name", "owner", "model", "thumbnail_detail", "size", "content_hash", "use_count", "cache_state",
        "cache_hits", "last_cache_hit", "created_at", "updated_at",
    ]
    actions = ["warm_cache", "warm_cache_everywhere", "drop_cache"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Templates are uploaded through the API, which decodes, orients and measures the image.
        return False

    def get_deleted_objects(self, objs, request: HttpRequest):
        """List queued and running jobs as protected, so the admin refuses the deletion as the API does."""
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        active = EditJob.objects.filter(template__in=list(objs), status__in=ACTIVE_STATUSES).select_related("template")
        protected = [
            *protected,
            *(
                _("Job %(job)s of template %(template)s is %(status)s; cancel it or wait until it ends.")
                % {"job": job.pk, "template": job.template_id, "status": job.get_status_display()}
                for job in active
            ),
        ]
        return deleted, model_count, perms_needed, protected

    def get_queryset(self, request: HttpRequest) -> QuerySet[Template]:
        hits = Q(jobs__cache_outcome=CacheOutcome.HIT)
        return (
            super().get_queryset(request)
            .select_related("owner")
            .prefetch_related("warmups")
            .annotate(
                hit_count=Count("jobs", filter=hits), last_hit_at=Max("jobs__finished_at", filter=hits)
            )
        )

    @admin.display(description=gettext_lazy("cache hits"), ordering="hit_count")
    def cache_hits(self, template: Template) -> int:
        """Jobs of this template that the activation cache served."""
        return template.hit_count

    @admin.display(description=gettext_lazy("last cache hit"), ordering="last_hit_at")
    def last_cache_hit(self, template: Template):
        return template.last_hit_at

    def get_urls(self):
        urls = [
            path(
                "<int:template_id>/image/",
                self.admin_site.admin_view(self.image_view),
                name="editing_template_image",
            ),
        ]
        return urls + super().get_urls()

    def image_view(self, request: HttpRequest, template_id: int) -> FileResponse:
        template = self.get_object(request, str(template_id))
        if template is None or not self.has_view_permission(request, template):
            raise Http404(_("Template %(id)s was not found.") % {"id": template_id})
        return image_response(template.image, filename=f"template-{template.pk}.png")

    def image_url(self, template: Template) -> str:
        return reverse("admin:editing_template_image", args=[template.pk])

    @admin.display(description=gettext_lazy("image"))
    def thumbnail_list(self, template: Template) -> str:
        return thumbnail(
            self.image_url(template), template.name, width=template.width, height=template.height, box_px=THUMBNAIL_LIST_PX
        )

    @admin.display(description=gettext_lazy("image"))
    def thumbnail_detail(self, template: Template) -> str:
        if not template.pk:
            return "—"
        return thumbnail(
            self.image_url(template), template.name, width=template.width, height=template.height, box_px=THUMBNAIL_DETAIL_PX
        )

    @admin.display(description=gettext_lazy("size in pixels"), ordering="width")
    def size(self, template: Template) -> str:
        return f"{template.width} × {template.height}"

    @admin.display(description=gettext_lazy("cache"))
    def cache_state(self, template: Template) -> str:
        """Describe the template's latest cache warm-up: status, tier, size and variant."""
        # Uses the prefetched warm-ups, newest first by the model's ordering.
        latest = next(iter(template.warmups.all()), None)
        if latest is None:
            return _("not warmed up")
        if latest.dropped_at is not None:
            return _("dropped")
        parts = [latest.get_status_display()]
        if latest.cache_tier:
            parts.append(latest.get_cache_tier_display())
        if latest.cache_bytes:
            parts.append(filesizeformat(latest.cache_bytes))
        if latest.variant:
            parts.append(cache_variant_label(latest.variant))
        return " · ".join(str(part) for part in parts)

    @admin.action(description=gettext_lazy("Warm the cache of the selected templates"))
    def warm_cache(self, request: HttpRequest, queryset: QuerySet[Template]) -> None:
        count = 0
        for template in queryset:
            warmups.request_warmup(template, requested_by=request.user)
            count += 1
        message = ngettext(
            "Queued a cache warm-up for %(count)d template.", "Queued cache warm-ups for %(count)d templates.", count
        )
        self.message_user(request, message % {"count": count}, messages.SUCCESS)

    @admin.action(description=gettext_lazy("Warm the cache of the selected templates on every live worker"))
    def warm_cache_everywhere(self, request: HttpRequest, queryset: QuerySet[Template]) -> None:
        queued = 0
        for template in queryset:
            try:
                queued += len(warmups.request_warmups_on_every_worker(template, requested_by=request.user))
            except warmups.NoLiveWorker as error:
                message = _("No live worker serves model %(model)s; start a worker, then warm again.")
                self.message_user(request, message % {"model": error.model}, messages.ERROR)
                return
            except warmups.FleetUnreadable:
                message = _("Could not read which workers are live: Redis did not respond. Try again in a few seconds.")
                self.message_user(request, message, messages.ERROR)
                return
        message = ngettext(
            "Queued %(count)d cache warm-up on the live workers.",
            "Queued %(count)d cache warm-ups on the live workers.",
            queued,
        )
        self.message_user(request, message % {"count": queued}, messages.SUCCESS)

    @admin.action(description=gettext_lazy("Drop the cache of the selected templates"))
    def drop_cache(self, request: HttpRequest, queryset: QuerySet[Template]) -> None:
        dropped = sum(warmups.drop_cache(template) for template in queryset)
        message = ngettext(
            "Dropped %(count)d cached warm-up; live workers remove its entry now, and others when they start.",
            "Dropped %(count)d cached warm-ups; live workers remove their entries now, and others when they start.",
            dropped,
        )
        self.message_user(request, message % {"count": dropped}, messages.SUCCESS)


class CacheOutcomeFilter(admin.SimpleListFilter):
    """Cache outcomes by their labels, plus jobs that have none because they never ran to the end."""

    title = gettext_lazy("cache outcome")
    parameter_name = "cache_outcome"
    NONE = "none"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [*CacheOutcome.choices, (self.NONE, gettext_lazy("none (cancelled, failed or not finished)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[EditJob]) -> QuerySet[EditJob]:
        value = self.value()
        if value == self.NONE:
            return queryset.filter(cache_outcome="")
        if value in CacheOutcome.values:
            return queryset.filter(cache_outcome=value)
        return queryset


@admin.register(EditJob)
class EditJobAdmin(admin.ModelAdmin):
    list_display = [
        "id", "owner", "template", "model", "status", "progress_percent", "mask_percent", "bucket",
        "cache_outcome_text", "timings_summary", "created_at",
    ]
    list_filter = ["status", "model", "bucket", "template", CacheOutcomeFilter]
    list_select_related = ["owner", "template"]
    search_fields = ["id", "prompt"]
    date_hierarchy = "created_at"
    # Every field is read-only: a job's record must keep matching its result, and cancelling goes through the
    # action, which moves the job through its state machine as the API does.
    readonly_fields = [
        "result_preview", "owner", "template", "model", "prompt", "seed", "steps", "guidance", "mask", "status",
        "cancel_requested", "progress", "mask_ratio", "bucket", "queue_name", "cache_outcome", "cache_variant",
        "cache_key", "flop_fraction", "timings_table", "result", error_reason, "worker", "attempts", "created_at",
        "started_at", "finished_at", "updated_at",
    ]
    exclude = ["timings", "error", "error_code", "error_params"]
    actions = ["cancel_jobs"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Jobs are submitted through the API, which validates the mask and queues the job.
        return False

    @admin.action(description=gettext_lazy("Cancel the selected jobs"))
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[EditJob]) -> None:
        cancelled = sum(services.cancel_job(job) for job in queryset)
        finished = queryset.count() - cancelled
        self.message_user(
            request,
            _("Jobs cancelled: %(cancelled)d (running ones stop after their current step). Already finished: "
              "%(finished)d.") % {"cancelled": cancelled, "finished": finished},
            messages.SUCCESS,
        )

    def get_urls(self):
        urls = [
            path(
                "<uuid:job_id>/<str:kind>.png",
                self.admin_site.admin_view(self.image_view),
                name="editing_editjob_image",
            ),
        ]
        return urls + super().get_urls()

    def image_view(self, request: HttpRequest, job_id, kind: str) -> FileResponse:
        job = self.get_object(request, str(job_id))
        if job is None or not self.has_view_permission(request, job) or kind not in ("mask", "result"):
            raise Http404(_("Job %(id)s was not found.") % {"id": job_id})
        return image_response(getattr(job, kind), filename=f"{kind}-{job.pk}.png")

    @admin.display(description=gettext_lazy("progress"), ordering="progress")
    def progress_percent(self, job: EditJob) -> str:
        return f"{job.progress * 100:.0f}%"

    @admin.display(description=gettext_lazy("mask ratio"), ordering="mask_ratio")
    def mask_percent(self, job: EditJob) -> str:
        return f"{job.mask_ratio * 100:.1f}%"

    @admin.display(description=gettext_lazy("cache outcome"), ordering="cache_outcome")
    def cache_outcome_text(self, job: EditJob) -> str:
        return cache_outcome_label(job.cache_outcome) if job.cache_outcome else "—"

    @admin.display(description=gettext_lazy("timings"))
    def timings_summary(self, job: EditJob) -> str:
        return timings_summary(job.timings)

    @admin.display(description=gettext_lazy("timings"))
    def timings_table(self, job: EditJob) -> str:
        return timings_table(job.timings)

    @admin.display(description=gettext_lazy("mask and result"))
    def result_preview(self, job: EditJob) -> str:
        if not job.pk:
            return "—"
        # Masks and results have the template's size.
        size = {"width": job.template.width, "height": job.template.height, "box_px": THUMBNAIL_DETAIL_PX}
        images = [thumbnail(reverse("admin:editing_editjob_image", args=[job.pk, "mask"]), _("mask"), **size)]
        if job.result:
            images.append(thumbnail(reverse("admin:editing_editjob_image", args=[job.pk, "result"]), _("result"), **size))
        return format_html_join(" ", "{}", ((image,) for image in images))


@admin.register(CacheWarmup)
class CacheWarmupAdmin(admin.ModelAdmin):
    list_display = [
        "id", "template", "model", "status", "variant", "cache_tier", "cache_size", "timings_summary", "created_at",
    ]
    list_filter = ["status", "model", "variant", "cache_tier"]
    list_select_related = ["template"]
    readonly_fields = [
        "template", "requested_by", "model", "seed", "steps", "guidance", "variant", "status", "progress", "cache_key",
        "cache_bytes", "cache_tier", "target_worker", "worker", "timings_table", error_reason, "attempts", "created_at",
        "started_at", "finished_at", "updated_at",
    ]
    exclude = ["timings", "error", "error_code", "error_params"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Warm-ups are queued through the template action or the API, which also enqueue the task.
        return False

    @admin.display(description=gettext_lazy("cache size"), ordering="cache_bytes")
    def cache_size(self, warmup: CacheWarmup) -> str:
        return filesizeformat(warmup.cache_bytes) if warmup.cache_bytes else "—"

    @admin.display(description=gettext_lazy("timings"))
    def timings_summary(self, warmup: CacheWarmup) -> str:
        return timings_summary(warmup.timings)

    @admin.display(description=gettext_lazy("timings"))
    def timings_table(self, warmup: CacheWarmup) -> str:
        return timings_table(warmup.timings)
