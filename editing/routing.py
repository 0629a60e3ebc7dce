"""Mask-ratio buckets and the Celery queues that serve them.

Similar mask ratios batch well together and cost about the same, so each bucket has its own queue
(``edit.m10`` receives jobs whose mask touches at most 10% of the latent tokens) and workers subscribe to
the buckets they serve with ``-Q``.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

QUEUE_PREFIX = "edit."
CONTROL_QUEUE = "edit.control"


@dataclass(frozen=True)
class Bucket:
    name: str  # "m10"
    upper_edge: float  # inclusive upper bound of the mask ratio

    @property
    def queue(self) -> str:
        return f"{QUEUE_PREFIX}{self.name}"


def buckets(edges: list[float] | None = None) -> list[Bucket]:
    edges = list(settings.EDITOR_BUCKET_EDGES if edges is None else edges)
    if not edges or sorted(edges) != edges or len(set(edges)) != len(edges):
        raise ImproperlyConfigured(f"EDITOR_BUCKET_EDGES={edges} must be strictly increasing.")
    if edges[0] <= 0 or abs(edges[-1] - 1.0) > 1e-9:
        raise ImproperlyConfigured(f"EDITOR_BUCKET_EDGES={edges} must be in (0, 1] and end with 1.0.")
    return [Bucket(name=f"m{round(edge * 100)}", upper_edge=edge) for edge in edges]


def bucket_for(mask_ratio: float, edges: list[float] | None = None) -> Bucket:
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} is outside [0, 1]")
    for bucket in buckets(edges):
        if mask_ratio <= bucket.upper_edge + 1e-12:
            return bucket
    raise AssertionError("the last bucket edge is 1.0, so every ratio has a bucket")


def all_queues(edges: list[float] | None = None) -> list[str]:
    return [bucket.queue for bucket in buckets(edges)] + [CONTROL_QUEUE]
