"""Mask-ratio buckets and the Celery queues that serve them.

Similar mask ratios batch well together and cost about the same, so each bucket of each model has its own
queue (``edit.flux.m10`` receives jobs for the model named ``flux`` whose mask touches at most 10% of the
latent tokens). Workers subscribe with ``-Q`` to the queues of the models they serve, so a job only reaches
a worker that has its model. Warm-ups of a model go to its ``control`` queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

QUEUE_PREFIX = "edit."
CONTROL = "control"


@dataclass(frozen=True)
class Bucket:
    name: str  # "m10"
    upper_edge: float  # inclusive upper bound of the mask ratio

    def queue(self, model: str) -> str:
        return f"{QUEUE_PREFIX}{model}.{self.name}"


def control_queue(model: str) -> str:
    """Return the queue of the model's warm-ups."""
    return f"{QUEUE_PREFIX}{model}.{CONTROL}"


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


def model_queues(model: str, edges: list[float] | None = None) -> list[str]:
    return [bucket.queue(model) for bucket in buckets(edges)] + [control_queue(model)]


def all_queues(models: list[str] | None = None, edges: list[float] | None = None) -> list[str]:
    """Return every queue of `models` (default: the models this worker serves, EDITOR_WORKER_MODELS)."""
    served = settings.EDITOR_WORKER_MODELS if models is None else models
    return [queue for model in served for queue in model_queues(model, edges)]
