"""Ranges of the generation parameters (seed, steps, guidance) that every job and warm-up must keep.

The API, the `edit` command and the services that create jobs and warm-ups all check against these, so a
value that no worker can run (or that JSON cannot carry, such as an infinite guidance) is never stored.
"""

from __future__ import annotations

import math

from django.conf import settings

MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 100.0


def generation_error(*, seed: int, steps: int, guidance: float) -> tuple[str, str] | None:
    """Return (parameter name, message) for the first value out of range, or None when all are valid."""
    if not 0 <= seed <= MAX_SEED:
        return "seed", f"seed must be between 0 and {MAX_SEED}; got {seed}."
    if not 1 <= steps <= settings.EDITOR_MAX_STEPS:
        return "steps", f"steps must be between 1 and {settings.EDITOR_MAX_STEPS}; got {steps}."
    if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        return "guidance", f"guidance must be a finite number between 0 and {MAX_GUIDANCE:g}; got {guidance}."
    return None


def check_generation(*, seed: int, steps: int, guidance: float) -> None:
    """Raise ValueError with the message of `generation_error` when a value is out of range."""
    error = generation_error(seed=seed, steps=steps, guidance=guidance)
    if error is not None:
        raise ValueError(error[1])
