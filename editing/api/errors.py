"""API exception handler: 404s that name the id, never 500s, 415s that name the accepted content types, and
401s that explain how to authenticate."""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.utils.translation import gettext as _
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


def not_found_detail(context: dict) -> str:
    """Return the 404 message for the object the request's URL names, in the request's language."""
    view = context.get("view")
    identifier = (getattr(view, "kwargs", None) or {}).get("pk")
    basename = getattr(view, "basename", None)
    if identifier is None or basename not in ("template", "job"):
        return _("Not found.")
    if basename == "template":
        return _(
            "Template %(id)s was not found, or it belongs to another user. GET /api/templates/ lists your templates."
        ) % {"id": identifier}
    return _("Job %(id)s was not found, or it belongs to another user. GET /api/jobs/ lists your jobs.") % {
        "id": identifier
    }


def exception_handler(exc: Exception, context: dict) -> Response | None:
    # Http404 comes from object lookups, and ValidationError from UUID lookups on malformed ids such as
    # /api/jobs/abc/. A NotFound that a view raises carries its own message and keeps it.
    if isinstance(exc, (Http404, DjangoValidationError)):
        return Response({"detail": not_found_detail(context)}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return Response({"detail": unsupported_media_detail(context)}, status=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE)
    response = drf_exception_handler(exc, context)
    if isinstance(exc, exceptions.NotAuthenticated) and response is not None:
        # DRF's handler sets the 401 status and its WWW-Authenticate header; only the message changes.
        response.data = {"detail": _(
            "Authentication credentials were not provided. Get a token with POST /api/token/ (username and "
            "password) and send it as the header 'Authorization: Token <token>', or log in to the web page."
        )}
    return response


def unsupported_media_detail(context: dict) -> str:
    """Return the 415 message: the content type sent and the ones this endpoint parses."""
    request = context.get("request")
    view = context.get("view")
    sent = getattr(request, "content_type", "") or _("none")
    accepted = ", ".join(parser.media_type for parser in view.get_parsers()) if view is not None else ""
    return _(
        "Content type %(sent)s is not accepted here; send one of %(accepted)s. Files such as image go in a "
        "multipart/form-data body (curl -F image=@photo.png)."
    ) % {"sent": sent, "accepted": accepted}
