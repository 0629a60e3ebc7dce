"""Failure reasons of jobs and warm-ups: stored as a code with parameters, shown in the reader's language.

Workers store a `Failure`: its code and parameters, plus the English text in the `error` column for logs,
searches and readers that predate the code. The API, the pages and the admin render the text again in the
language of the request, so a Japanese operator reads the reason and the fix in Japanese.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.utils import translation
from django.utils.translation import gettext_lazy as _

# Message templates by code, filled with %-formatting. Every template names what to do next.
MESSAGES = {
    "interrupted": _(
        "The job was interrupted %(attempts)d times (its worker stopped while running it); giving up. "
        "Submit the job again."
    ),
    "disk_full": _(
        "The result could not be stored because the media disk is full (%(detail)s); free disk space under "
        "EDITOR_MEDIA_ROOT and submit the job again."
    ),
    "storage": _(
        "The result could not be stored in the media directory (%(detail)s); make EDITOR_MEDIA_ROOT writable "
        "for the worker and submit the job again."
    ),
    "timed_out": _(
        "The job timed out: it ran longer than the time limit of %(limit)s s (EDITOR_JOB_SOFT_TIME_LIMIT_S); "
        "use fewer steps or a smaller image."
    ),
    "out_of_memory": _(
        "The job ran out of memory at %(pixels)d working pixels and again at %(smaller)d (%(detail)s); lower "
        "EDITOR_MAX_WORK_PIXELS or give the worker more memory."
    ),
    "edit_error": _(
        "The edit failed with an unexpected error (%(detail)s). Submit the job again; if it fails again, "
        "send this message to the administrator."
    ),
    "warmup_error": _(
        "The warm-up failed with an unexpected error (%(detail)s). Jobs on this template still run, without "
        "the cache; warm it again with POST /api/templates/%(template)s/warm/ or the admin action "
        '"Warm the cache of the selected templates".'
    ),
}


@dataclass(frozen=True)
class Failure:
    """A failure reason: a code of `MESSAGES` and the parameters its template needs."""

    code: str
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in MESSAGES:
            raise ValueError(f"Unknown failure code {self.code!r}; known codes: {', '.join(sorted(MESSAGES))}.")

    def text(self) -> str:
        """Return the message in the active language."""
        return str(MESSAGES[self.code]) % self.params

    def english(self) -> str:
        """Return the message in English, as stored in the `error` column."""
        with translation.override("en"):
            return self.text()

    def fields(self) -> dict[str, object]:
        """Return the model field values that store this failure."""
        return {"error": self.english(), "error_code": self.code, "error_params": dict(self.params)}


def exception_failure(code: str, error: BaseException, **params: object) -> Failure:
    """Build a failure for an unexpected exception (`edit_error`, `warmup_error`) with the exception's text."""
    return Failure(code, {"detail": f"{type(error).__name__}: {error}", **params})


def localized_error(error: str, code: str, params: dict[str, object] | None) -> str:
    """Return the stored failure in the active language, or the stored English `error` for rows without a code."""
    if not code or code not in MESSAGES:
        return error
    try:
        return Failure(code, dict(params or {})).text()
    except (KeyError, TypeError, ValueError):
        # The parameters no longer fit the template, because the message changed after the row was written.
        return error
