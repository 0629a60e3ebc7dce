"""REST API for templates and edit jobs. Every object is scoped to the requesting user."""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.db import transaction
from django.http import FileResponse
from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.renderers import JSONRenderer
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

from editing import catalog, fleet, services, warmups
from editing.api.serializers import (
    JobCreateSerializer,
    JobSerializer,
    ModelInfoSerializer,
    TemplateCreateSerializer,
    TemplateSerializer,
    WarmupRequestSerializer,
    WarmupSerializer,
)
from editing.models import ACTIVE_STATUSES, EditJob, JobStatus, Template

logger = logging.getLogger(__name__)

# Password attempts per client address on POST /api/token/.
TOKEN_LOGIN_RATE = "10/min"
WARMUP_LIST_LIMIT = 100


def file_response(field_file, *, filename: str) -> FileResponse:
    if not field_file:
        raise exceptions.NotFound(_("This object has no stored image."))
    try:
        handle = field_file.open("rb")
    except FileNotFoundError:
        logger.error("stored file %s is missing", field_file.name)
        raise exceptions.NotFound(
            _("The stored image file is missing from the media folder; ask an administrator.")
        ) from None
    return FileResponse(handle, content_type="image/png", filename=filename)


class TokenLoginThrottle(AnonRateThrottle):
    """Limits password attempts on the token endpoint per client address."""

    scope = "token_login"

    def get_rate(self) -> str:
        return TOKEN_LOGIN_RATE


class TokenView(ObtainAuthToken):
    """Exchange a user name and password for the user's API token (created on first use)."""

    throttle_classes = [TokenLoginThrottle]
    renderer_classes = [JSONRenderer]

    def throttled(self, request: Request, wait: float | None) -> None:
        seconds = math.ceil(wait or 1)
        detail = _(
            "Too many sign-in attempts from this address; the limit is %(rate)s. Try again in %(seconds)d s."
        ) % {"rate": TOKEN_LOGIN_RATE, "seconds": seconds}
        error = exceptions.Throttled(detail=detail)
        # Set after construction, as for job submissions, so DRF does not append its own English sentence.
        error.wait = seconds
        raise error


class JobSubmitThrottle(UserRateThrottle):
    """Limits job submissions per user to EDITOR_JOB_SUBMIT_RATE, read at request time."""

    scope = "job_submit"

    def get_rate(self) -> str | None:
        return settings.EDITOR_JOB_SUBMIT_RATE


class TemplateViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = TemplateSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            # Schema generation has no user; the empty queryset still gives the id's type.
            return Template.objects.none()
        return Template.objects.filter(owner=self.request.user)

    @extend_schema(request={"multipart/form-data": TemplateCreateSerializer}, responses={201: TemplateSerializer})
    def create(self, request: Request) -> Response:
        serializer = TemplateCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        template = services.create_template(
            owner=request.user, name=serializer.validated_data["name"], image=serializer.validated_data["pixels"],
            model=serializer.validated_data.get("model", ""),
        )
        return Response(TemplateSerializer(template).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        description="Delete the template together with its jobs and their results. Refused with 409 while one of "
        "its jobs is queued or running."
    )
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        template = self.get_object()
        with transaction.atomic():
            if template.jobs.filter(status__in=ACTIVE_STATUSES).exists():
                return Response(
                    {"detail": _("Template %(id)s still has queued or running jobs; cancel them or wait, then delete it.")
                     % {"id": template.pk}},
                    status=status.HTTP_409_CONFLICT,
                )
            template.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=WarmupRequestSerializer, responses={202: WarmupSerializer})
    @action(detail=True, methods=["post"], url_path="warm", url_name="warm", parser_classes=[MultiPartParser, FormParser, JSONParser])
    def warm(self, request: Request, pk: str | None = None) -> Response:
        """Queue a warm-up that caches this template's activations for the given job parameters."""
        template = self.get_object()
        serializer = WarmupRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        warmup = warmups.request_warmup(template, requested_by=request.user, **serializer.validated_data)
        return Response(WarmupSerializer(warmup).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=WarmupRequestSerializer, responses={202: WarmupSerializer(many=True)})
    @action(
        detail=True, methods=["post"], url_path="warm-all", url_name="warm-all",
        parser_classes=[MultiPartParser, FormParser, JSONParser],
    )
    def warm_all(self, request: Request, pk: str | None = None) -> Response:
        """Queue one warm-up per live worker of the model, so every worker's own cache stores the template."""
        template = self.get_object()
        serializer = WarmupRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            queued = warmups.request_warmups_on_every_worker(
                template, requested_by=request.user, **serializer.validated_data
            )
        except warmups.NoLiveWorker as error:
            return Response(
                {"detail": _(
                    "No live worker serves model %(model)s, so no worker can be warmed now. Start a worker and "
                    "try again, or use POST /api/templates/%(id)s/warm/, which waits for the next worker."
                ) % {"model": error.model, "id": template.pk}},
                status=status.HTTP_409_CONFLICT,
            )
        except warmups.FleetUnreadable:
            return Response(
                {"detail": _(
                    "Could not read which workers are live: Redis did not respond. Nothing was queued; try again "
                    "in a few seconds."
                )},
                status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"},
            )
        return Response(WarmupSerializer(queued, many=True).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: WarmupSerializer(many=True)})
    @action(detail=True, methods=["get"], url_path="warmups", url_name="warmups")
    def warmup_list(self, request: Request, pk: str | None = None) -> Response:
        """List this template's warm-ups, newest first (at most WARMUP_LIST_LIMIT), to follow each one."""
        template = self.get_object()
        rows = template.warmups.all()[:WARMUP_LIST_LIMIT]
        return Response(WarmupSerializer(rows, many=True).data)

    @extend_schema(request=None, responses={200: OpenApiResponse(description="Number of dropped warm-ups")})
    @action(detail=True, methods=["delete"], url_path="cache", url_name="cache")
    def drop_cache(self, request: Request, pk: str | None = None) -> Response:
        """Drop this template's cached activations; live workers remove them from memory and disk."""
        template = self.get_object()
        return Response({"dropped": warmups.drop_cache(template)})

    @extend_schema(responses={(200, "image/png"): OpenApiResponse(description="The upright template PNG")})
    @action(detail=True, methods=["get"], url_path="image", url_name="image")
    def image(self, request: Request, pk: str | None = None) -> FileResponse:
        template = self.get_object()
        return file_response(template.image, filename=f"template-{template.pk}.png")


class ModelViewSet(viewsets.ViewSet):
    """The models this deployment serves; jobs and templates name one of them."""

    @extend_schema(responses={200: ModelInfoSerializer(many=True)})
    def list(self, request: Request) -> Response:
        workers = fleet.live_workers()
        default = catalog.default_model().name
        rows = [
            {
                "name": spec.name,
                "family": spec.family,
                "family_label": spec.facts.label,
                "native_resolution": catalog.native_resolution(spec),
                "pixels_per_token": spec.facts.pixels_per_token,
                "default": spec.name == default,
                # None when no worker is live (or Redis is unreachable), so nothing is known.
                "served_by_live_worker": any(spec.name in w.models for w in workers) if workers else None,
            }
            for spec in catalog.models()
        ]
        return Response(ModelInfoSerializer(rows, many=True).data)


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = JobSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return EditJob.objects.none()
        return EditJob.objects.filter(owner=self.request.user).select_related("template")

    def filter_queryset(self, queryset):
        """Apply the list filters `?status=` and `?template=`, rejecting values that match nothing by form."""
        if self.action != "list":
            return queryset
        status_filter = self.request.query_params.get("status")
        if status_filter is not None:
            if status_filter not in JobStatus.values:
                raise exceptions.ValidationError({"status": [_(
                    "%(value)r is not a job status; use one of %(choices)s."
                ) % {"value": status_filter, "choices": ", ".join(JobStatus.values)}]})
            queryset = queryset.filter(status=status_filter)
        template_filter = self.request.query_params.get("template")
        if template_filter is not None:
            if not template_filter.isdigit():
                raise exceptions.ValidationError({"template": [_(
                    "%(value)r is not a template id; use the number from GET /api/templates/."
                ) % {"value": template_filter}]})
            queryset = queryset.filter(template_id=int(template_filter))
        return queryset

    @extend_schema(parameters=[
        OpenApiParameter("status", str, enum=JobStatus.values, description="Only jobs with this status."),
        OpenApiParameter("template", int, description="Only jobs of this template."),
    ])
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

    def get_throttles(self) -> list:
        return [JobSubmitThrottle()] if self.action == "create" else []

    def throttled(self, request: Request, wait: float | None) -> None:
        detail = _("Too many job submissions; the limit is %(rate)s per user. Try again in %(seconds)d s.") % {
            "rate": settings.EDITOR_JOB_SUBMIT_RATE, "seconds": math.ceil(wait or 1),
        }
        error = exceptions.Throttled(detail=detail)
        # Set after construction so DRF does not append its own English sentence to the message;
        # the exception handler turns it into the Retry-After header.
        error.wait = math.ceil(wait or 1)
        raise error

    @extend_schema(request={"multipart/form-data": JobCreateSerializer}, responses={201: JobSerializer})
    def create(self, request: Request) -> Response:
        serializer = JobCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        job = services.submit_job(
            owner=request.user,
            template=data["template"],
            mask=data["mask_pixels"],
            prompt=data["prompt"],
            seed=data["seed"],
            steps=data["steps"],
            guidance=data["guidance"],
            model=data.get("model") or None,
        )
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, 409: OpenApiResponse(description="The job is queued or running")})
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        """Delete a finished job with its mask and result."""
        job = self.get_object()
        # A final job never becomes active again, so the status just read decides.
        if not job.is_final:
            return Response(
                {"detail": _("Job %(id)s is %(status)s; cancel it first (POST /api/jobs/%(id)s/cancel/), then "
                             "delete it.") % {"id": job.pk, "status": job.status}},
                status=status.HTTP_409_CONFLICT,
            )
        job.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: JobSerializer, 409: OpenApiResponse(description="Already finished")})
    @action(detail=True, methods=["post"], url_path="cancel", url_name="cancel")
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()
        if not services.cancel_job(job):
            job.refresh_from_db()
            return Response(
                {"detail": _("Job %(id)s has already finished with status %(status)s; there is nothing to cancel.")
                 % {"id": job.pk, "status": job.status}},
                status=status.HTTP_409_CONFLICT,
            )
        job.refresh_from_db()
        return Response(JobSerializer(job).data)

    @extend_schema(responses={(200, "image/png"): OpenApiResponse(description="The edited image")})
    @action(detail=True, methods=["get"], url_path="result", url_name="result")
    def result(self, request: Request, pk: str | None = None) -> FileResponse:
        job = self.get_object()
        if not job.result and job.status == JobStatus.CANCELLED:
            raise exceptions.NotFound(
                _("Job %(id)s was cancelled, so it has no result; submit the edit again.") % {"id": job.pk}
            )
        if not job.result and job.is_final:
            raise exceptions.NotFound(
                _("Job %(id)s has no result because it ended with status %(status)s; see its error, or submit the "
                  "edit again.") % {"id": job.pk, "status": job.status}
            )
        if not job.result:
            raise exceptions.NotFound(
                _("Job %(id)s has no result yet; its status is %(status)s. Poll GET /api/jobs/%(id)s/ until it is "
                  "succeeded.") % {"id": job.pk, "status": job.status}
            )
        return file_response(job.result, filename=f"edit-{job.pk}.png")
