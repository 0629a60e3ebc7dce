"""Templates and edit jobs.

An edit job moves through a small state machine::

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled

Every transition is a conditional UPDATE on the current status (see ``editing.jobstate``), so two
processes racing for the same job cannot both win.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from editing.failures import localized_error


def template_upload_path(instance: "Template", filename: str) -> str:
    # Stored names are generated; the client's file name is never used on disk.
    return f"templates/{uuid.uuid4().hex}.img"


def mask_upload_path(instance: "EditJob", filename: str) -> str:
    return f"masks/{uuid.uuid4().hex}.img"


def result_upload_path(instance: "EditJob", filename: str) -> str:
    return f"results/{uuid.uuid4().hex}.png"


class Template(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="templates", verbose_name=_("owner")
    )
    name = models.CharField(_("name"), max_length=200)
    image = models.FileField(_("image"), upload_to=template_upload_path)
    # Upright size, after EXIF orientation.
    width = models.PositiveIntegerField(_("width"))
    height = models.PositiveIntegerField(_("height"))
    # sha256 of the upright 8-bit RGB pixels and their size: identical content shares one cache.
    content_hash = models.CharField(_("content hash"), max_length=64, db_index=True)
    # Name of the model (an EDITOR_MODELS entry) that jobs on this template use unless they name one.
    model = models.CharField(_("model"), max_length=32, blank=True, default="")
    # Incremented when a job is submitted and decremented when it is cancelled (editing.jobstate).
    use_count = models.PositiveIntegerField(
        _("use count"), default=0, help_text=_("Edit jobs submitted on this template, not counting cancelled ones.")
    )
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("template")
        verbose_name_plural = _("templates")

    def __str__(self) -> str:
        return f"{self.name} ({self.width}×{self.height})"


class JobStatus(models.TextChoices):
    QUEUED = "queued", _("queued")
    RUNNING = "running", _("running")
    SUCCEEDED = "succeeded", _("succeeded")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class CacheVariant(models.TextChoices):
    KV = "kv", _("attention keys and values")
    HIDDEN = "hidden", _("hidden states")


class CacheTier(models.TextChoices):
    MEMORY = "memory", _("memory")
    DISK = "disk", _("disk")
    NONE = "none", _("not stored")


class EditJob(models.Model):
    id = models.UUIDField("ID", primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="edit_jobs", verbose_name=_("owner")
    )
    template = models.ForeignKey(Template, on_delete=models.CASCADE, related_name="jobs", verbose_name=_("template"))
    mask = models.FileField(_("mask"), upload_to=mask_upload_path)
    prompt = models.TextField(_("prompt"))
    seed = models.BigIntegerField(_("seed"))
    steps = models.PositiveIntegerField(_("steps"))
    guidance = models.FloatField(_("guidance"))
    # Name of the model (an EDITOR_MODELS entry) the job runs on.
    model = models.CharField(_("model"), max_length=32, blank=True, default="")

    status = models.CharField(
        _("status"), max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    progress = models.FloatField(_("progress"), default=0.0)
    cancel_requested = models.BooleanField(_("cancel requested"), default=False)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)

    mask_ratio = models.FloatField(_("mask ratio"))
    bucket = models.CharField(_("bucket"), max_length=16, db_index=True)
    queue_name = models.CharField(_("queue"), max_length=64)

    # How the activation cache of the template served this job (see CacheOutcome).
    cache_outcome = models.CharField(_("cache outcome"), max_length=24, blank=True)
    cache_variant = models.CharField(_("cache variant"), max_length=8, blank=True, choices=CacheVariant.choices)
    cache_key = models.CharField(_("cache key"), max_length=64, blank=True)
    # Transformer FLOPs this job computed, as a fraction of a full recompute (1.0 without the cache).
    flop_fraction = models.FloatField(_("FLOP fraction"), null=True, blank=True)

    # Milliseconds per phase: load, preprocess, denoise, decode, composite, store.
    timings = models.JSONField(_("timings (ms)"), default=dict, blank=True)
    result = models.FileField(_("result"), upload_to=result_upload_path, blank=True)
    error = models.TextField(_("error"), blank=True)
    # The failure's code and parameters (editing/failures.py), so its text is shown in the reader's language.
    error_code = models.CharField(_("error code"), max_length=32, blank=True)
    error_params = models.JSONField(_("error parameters"), default=dict, blank=True)
    worker = models.CharField(_("worker"), max_length=200, blank=True)

    created_at = models.DateTimeField(_("created at"), auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("edit job")
        verbose_name_plural = _("edit jobs")
        indexes = [models.Index(fields=["queue_name", "status", "created_at"])]

    def __str__(self) -> str:
        return _("job %(id)s (%(status)s)") % {"id": self.id, "status": self.get_status_display()}

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def error_text(self) -> str:
        """The reason the job failed, in the active language."""
        return localized_error(self.error, self.error_code, self.error_params)

    @property
    def cache_used(self) -> bool | None:
        if not self.cache_outcome:
            return None
        return self.cache_outcome == CacheOutcome.HIT


class CacheOutcome(models.TextChoices):
    HIT = "hit", _("cache hit: only masked tokens computed")
    MISS_FULL = "miss_full", _("cache miss: full computation, warm-up queued")
    MISS_WARM_FIRST = "miss_warm_first", _("cache miss: warmed up first, then masked computation")
    BYPASS = "bypass", _("full computation: the mask covers too much for the cache to help")


class CacheWarmup(models.Model):
    """One full inference on a template with nothing masked, recording its activations in a worker's cache."""

    template = models.ForeignKey(
        Template, on_delete=models.CASCADE, related_name="warmups", verbose_name=_("template")
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
        verbose_name=_("requested by"),
    )
    seed = models.BigIntegerField(_("seed"))
    steps = models.PositiveIntegerField(_("steps"))
    guidance = models.FloatField(_("guidance"))
    variant = models.CharField(_("cache variant"), max_length=8, choices=CacheVariant.choices)
    # Name of the model (an EDITOR_MODELS entry) whose activations this warm-up records.
    model = models.CharField(_("model"), max_length=32, blank=True, default="")

    status = models.CharField(
        _("status"), max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    progress = models.FloatField(_("progress"), default=0.0)
    cache_key = models.CharField(_("cache key"), max_length=64, blank=True, db_index=True)
    cache_bytes = models.BigIntegerField(_("cache size (bytes)"), null=True, blank=True)
    cache_tier = models.CharField(_("cache tier"), max_length=8, blank=True, choices=CacheTier.choices)
    worker = models.CharField(_("worker"), max_length=200, blank=True)
    # Set when the warm-up was requested for one worker: it goes to that worker's own queue while the
    # worker is live, so that worker's cache stores the entry. Empty: any worker of the model runs it.
    target_worker = models.CharField(_("requested worker"), max_length=200, blank=True, default="")
    timings = models.JSONField(_("timings (ms)"), default=dict, blank=True)
    error = models.TextField(_("error"), blank=True)
    error_code = models.CharField(_("error code"), max_length=32, blank=True)
    error_params = models.JSONField(_("error parameters"), default=dict, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    # Set when an operator drops the cache: workers then discard the entry instead of using it.
    dropped_at = models.DateTimeField(_("dropped at"), null=True, blank=True)

    created_at = models.DateTimeField(_("created at"), auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("cache warm-up")
        verbose_name_plural = _("cache warm-ups")

    def __str__(self) -> str:
        return _("warm-up %(id)s of template %(template)s (%(status)s)") % {
            "id": self.pk, "template": self.template_id, "status": self.get_status_display(),
        }

    @property
    def error_text(self) -> str:
        """The reason the warm-up failed, in the active language."""
        return localized_error(self.error, self.error_code, self.error_params)
