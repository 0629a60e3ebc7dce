"""API serializers: every upload and parameter is validated here, at the edge."""

from __future__ import annotations

import os

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.urls import reverse
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from editing import catalog, fleet, imaging, services
from editing.api.fields import BoundedFloatField, BoundedIntegerField, echo, field_label
from editing.models import CacheWarmup, EditJob, Template
from editing.params import MAX_GUIDANCE, MAX_SEED

ERROR_HELP = "Why it failed, in the request's language (Accept-Language); empty unless the status is failed."


def read_upload(upload: UploadedFile, *, field: str) -> bytes:
    """Read an uploaded file, rejecting it by its declared size before reading it whole."""
    limit = settings.EDITOR_MAX_UPLOAD_BYTES
    if upload.size is not None and upload.size > limit:
        raise serializers.ValidationError(
            {
                field: _(
                    "The file is %(size)s (%(size_bytes)d bytes), over the limit of %(limit)s (%(limit_bytes)d "
                    "bytes); upload a smaller file."
                ) % {
                    "size": imaging.megabytes(upload.size), "size_bytes": upload.size,
                    "limit": imaging.megabytes(limit), "limit_bytes": limit,
                }
            }
        )
    return upload.read()


def decode_template(upload: UploadedFile) -> np.ndarray:
    data = read_upload(upload, field="image")
    try:
        pixels = imaging.read_template(
            data, max_pixels=settings.EDITOR_MAX_PIXELS, max_bytes=settings.EDITOR_MAX_UPLOAD_BYTES
        )
        height, width = pixels.shape[:2]
        imaging.check_template_shape(width, height)
    except imaging.ImageRuleError as error:
        raise serializers.ValidationError({"image": str(error)}) from None
    return pixels


def validate_model_name(value: str) -> str:
    """Check that a job, template or warm-up names a served model that a live worker runs."""
    name = (value or "").strip()
    if not name:
        return ""
    if catalog.get(name) is None:
        raise serializers.ValidationError(
            _("model '%(value)s' is not served here; use one of: %(names)s (GET /api/models/ lists them).")
            % {"value": echo(name), "names": ", ".join(catalog.names())}
        )
    if fleet.unserved(name):
        raise serializers.ValidationError(
            _("No running worker serves model '%(value)s'; start a worker with it in EDITOR_WORKER_MODELS or pick "
              "another model.") % {"value": name}
        )
    return name


class ModelField(serializers.CharField):
    """Optional name of a served model (GET /api/models/); empty takes the template's or the default model."""

    def __init__(self, **kwargs) -> None:
        super().__init__(required=False, allow_blank=True, max_length=64, validators=[], **kwargs)

    def to_internal_value(self, data) -> str:
        return validate_model_name(super().to_internal_value(data))


class ModelInfoSerializer(serializers.Serializer):
    name = serializers.CharField()
    family = serializers.CharField()
    family_label = serializers.CharField()
    native_resolution = serializers.IntegerField()
    pixels_per_token = serializers.IntegerField()
    default = serializers.BooleanField()
    served_by_live_worker = serializers.BooleanField(allow_null=True)


class WarmupSerializer(serializers.ModelSerializer):
    class Meta:
        model = CacheWarmup
        fields = [
            "id", "template", "model", "status", "progress", "seed", "steps", "guidance", "variant", "cache_key",
            "cache_bytes", "cache_tier", "worker", "target_worker", "timings", "error", "created_at", "finished_at", "dropped_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "cache_tier": {"help_text": (
                "Tier of the entry on the worker that stored it: memory, disk, or none. Set when the warm-up "
                "stores it, and updated when the worker restarts or drops the entry. With write-through (the "
                "default) a memory entry is on disk too and shows as disk after a restart."
            )},
            "dropped_at": {"help_text": "When the cache was dropped; jobs no longer use it. Null while it is valid."},
            "target_worker": {"help_text": (
                "The worker this warm-up was requested for (POST /api/templates/{id}/warm-all/), or empty when "
                "any worker of the model may run it. `worker` is the one that ran it."
            )},
        }

    error = serializers.CharField(source="error_text", read_only=True, help_text=ERROR_HELP)


class WarmupRequestSerializer(serializers.Serializer):
    seed = BoundedIntegerField(minimum=0, maximum=MAX_SEED, example=42, required=False)
    steps = BoundedIntegerField(minimum=1, maximum=100, example=20, required=False)
    guidance = BoundedFloatField(minimum=0.0, maximum=MAX_GUIDANCE, example=30.0, required=False)
    model = ModelField()


class TemplateSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()
    cache = serializers.SerializerMethodField()

    class Meta:
        model = Template
        fields = [
            "id", "name", "model", "width", "height", "content_hash", "use_count", "image_url", "cache", "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(WarmupSerializer(allow_null=True))
    def get_cache(self, template: Template) -> dict | None:
        """Summarize the latest warm-up of this template: its state, size and parameters."""
        latest = template.warmups.first()
        return WarmupSerializer(latest).data if latest else None

    @extend_schema_field(serializers.CharField())
    def get_image_url(self, template: Template) -> str:
        return reverse("template-image", args=[template.pk])


MAX_TEMPLATE_NAME_CHARS = 200


def reject_nul_characters(field: str):
    """Return a validator that rejects text containing NUL characters, naming `field` and the position."""

    def validate(value: str) -> None:
        if "\x00" in value:
            raise serializers.ValidationError(
                _("%(field)s contains a NUL character (code 0) at character %(index)d; remove it.")
                % {"field": field_label(field), "index": value.index("\x00") + 1}
            )

    return validate


def file_field_messages(field: str, content: str) -> dict[str, str]:
    """Return DRF FileField error messages that name `field`, describe its `content` and how to send it."""
    send_hint = _("send it as a file in a multipart/form-data request")
    parts = {"field": field_label(field), "what": content, "how": send_hint}
    return {
        "required": _("%(field)s is required: %(what)s; %(how)s.") % parts,
        "invalid": _("%(field)s must be a file: %(what)s; %(how)s.") % parts,
        "empty": _("The %(field)s file is empty (0 bytes); choose the file again.") % parts,
        "no_name": _("The %(field)s file has no file name; %(how)s.") % parts,
    }


class TemplateCreateSerializer(serializers.Serializer):
    image = serializers.FileField(help_text="Photo or banner: PNG, JPEG, WebP, TIFF, BMP or GIF.")
    name = serializers.CharField(required=False, allow_blank=True)
    model = ModelField()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Built per request, so the messages are in the request's language.
        self.fields["image"].error_messages.update(
            file_field_messages("image", _("the photo or banner (PNG, JPEG, WebP, TIFF, BMP or GIF)"))
        )
        self.fields["name"].validators = [reject_nul_characters("name")]

    def validate_name(self, value: str) -> str:
        if len(value) > MAX_TEMPLATE_NAME_CHARS:
            raise serializers.ValidationError(
                _("name has %(count)d characters, over the limit of %(limit)d; shorten it.")
                % {"count": len(value), "limit": MAX_TEMPLATE_NAME_CHARS}
            )
        return value

    def validate(self, attrs: dict) -> dict:
        attrs["pixels"] = decode_template(attrs["image"])
        name = (attrs.get("name") or "").strip()
        if not name:
            # The client's file name is display text only; the stored file name is generated.
            stem = os.path.splitext(os.path.basename(attrs["image"].name or ""))[0]
            name = stem[:MAX_TEMPLATE_NAME_CHARS] or "template"
        attrs["name"] = name
        return attrs


class JobSerializer(serializers.ModelSerializer):
    template = serializers.PrimaryKeyRelatedField(read_only=True)
    queue = serializers.CharField(source="queue_name", read_only=True)
    queue_position = serializers.SerializerMethodField()
    cache_used = serializers.BooleanField(read_only=True, allow_null=True)
    result_url = serializers.SerializerMethodField()
    error = serializers.CharField(source="error_text", read_only=True, help_text=ERROR_HELP)

    class Meta:
        model = EditJob
        fields = [
            "id", "template", "model", "prompt", "seed", "steps", "guidance", "status", "progress",
            "queue_position", "mask_ratio", "bucket", "queue", "cache_used", "cache_outcome",
            "cache_variant", "flop_fraction", "timings", "result_url", "error",
            "cancel_requested", "attempts", "created_at", "started_at", "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_queue_position(self, job: EditJob) -> int | None:
        return services.queue_position(job)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_result_url(self, job: EditJob) -> str | None:
        if not job.result:
            return None
        return reverse("job-result", args=[job.pk])


@extend_schema_field(OpenApiTypes.INT)
class TemplateIdField(serializers.CharField):
    """A template id, read as text so that a malformed id gets the job serializer's own message."""


class JobCreateSerializer(serializers.Serializer):
    template = TemplateIdField(help_text="Id of one of your templates.")
    mask = serializers.FileField(
        help_text="Mask image of the template's size: white (or opaque) pixels are edited."
    )
    prompt = serializers.CharField(max_length=None, allow_blank=True, trim_whitespace=True)
    seed = BoundedIntegerField(minimum=0, maximum=MAX_SEED, example=42, required=False)
    steps = BoundedIntegerField(minimum=1, maximum=100, example=20, required=False)
    guidance = BoundedFloatField(minimum=0.0, maximum=MAX_GUIDANCE, example=30.0, required=False)
    model = ModelField()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Built per request, so the messages are in the request's language.
        self.fields["mask"].error_messages.update(
            file_field_messages("mask", _("a mask image of the template's size, white where the edit goes"))
        )
        required = {
            "template": _("template is required: the id of one of your templates (GET /api/templates/ lists them)."),
            "prompt": _("prompt is required: describe what the masked region should show."),
        }
        for name, message in required.items():
            self.fields[name].error_messages.update({"required": message, "null": message})
        self.fields["template"].error_messages["blank"] = required["template"]
        # DRF's own message for a NUL character reads as "enter some characters" in its Japanese catalogue.
        self.fields["prompt"].validators = [reject_nul_characters("prompt")]

    def validate_template(self, value: str) -> Template:
        owner = self.context["request"].user
        try:
            template_id = int(str(value).strip())
        except ValueError:
            raise serializers.ValidationError(
                _("template must be the numeric id of one of your templates; got '%(value)s'.")
                % {"value": echo(value)}
            ) from None
        template = Template.objects.filter(pk=template_id, owner=owner).first()
        if template is None:
            raise serializers.ValidationError(
                _("Template %(value)s was not found among your templates; upload it first or pick another id.")
                % {"value": template_id}
            )
        return template

    def validate_prompt(self, value: str) -> str:
        limit = settings.EDITOR_MAX_PROMPT_CHARS
        if not value:
            raise serializers.ValidationError(
                _("prompt is empty; describe what the masked region should show.")
            )
        if len(value) > limit:
            raise serializers.ValidationError(
                _("prompt has %(count)d characters, over the limit of %(limit)d; shorten it.")
                % {"count": len(value), "limit": limit}
            )
        return value

    def validate_steps(self, value: int) -> int:
        limit = settings.EDITOR_MAX_STEPS
        if value > limit:
            raise serializers.ValidationError(
                _("steps must be between 1 and %(max)d; got %(value)d.") % {"max": limit, "value": value}
            )
        return value

    def validate(self, attrs: dict) -> dict:
        template: Template = attrs["template"]
        data = read_upload(attrs["mask"], field="mask")
        try:
            attrs["mask_pixels"] = imaging.read_mask(
                data,
                size=(template.width, template.height),
                max_pixels=settings.EDITOR_MAX_PIXELS,
                max_bytes=settings.EDITOR_MAX_UPLOAD_BYTES,
            )
        except imaging.ImageRuleError as error:
            raise serializers.ValidationError({"mask": str(error)}) from None
        attrs.setdefault("seed", settings.EDITOR_DEFAULT_SEED)
        attrs.setdefault("steps", settings.EDITOR_DEFAULT_STEPS)
        attrs.setdefault("guidance", 30.0)
        return attrs
