"""API exception handler: malformed ids and missing objects become 404s, never 500s."""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils.translation import gettext as _
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    response = drf_exception_handler(exc, context)
    if response is not None:
        return response
    if isinstance(exc, DjangoValidationError):
        # Raised by UUID lookups on malformed ids such as /api/jobs/not-a-uuid/.
        return Response({"detail": _("Not found.")}, status=status.HTTP_404_NOT_FOUND)
    return None
