"""The worker's activation cache: the cache identity of a job, and reads and writes of warm-ups.

Each worker process owns one ``cache.ActivationStore`` (host memory plus a local disk tier). This module
converts between the store's flat tensors and ``TemplateActivations`` of the masked engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading

from cache.compression import encoded_nbytes_of
from cache.config import CacheSettings, build_store
from cache.keys import CacheKey
from cache.store import ActivationStore
from workers.masked.activations import ActivationsMetadata, TemplateActivations
from workers.model_loading import LoadedModel

logger = logging.getLogger(__name__)

_store: ActivationStore | None = None
_store_lock = threading.Lock()


def get_store() -> ActivationStore:
    """Return this process's store, built from ``EDITOR_CACHE_*`` settings on first use."""
    global _store
    with _store_lock:
        if _store is None:
            settings = CacheSettings.from_env()
            _store = build_store(settings)
            logger.info(
                "activation cache: %d MiB memory, %d MiB disk at %s, policy %s, codec %s",
                settings.memory_bytes >> 20, settings.disk_bytes >> 20, settings.directory,
                settings.policy, settings.codec,
            )
        return _store


def reset_store() -> None:
    """Forget this process's store (tests build a fresh one per case)."""
    global _store
    with _store_lock:
        _store = None


def scheduler_hash(model: LoadedModel) -> str:
    config = dict(model.pipe.scheduler.config)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_hash(prompt: str, max_sequence_length: int) -> str:
    return hashlib.sha256(f"{max_sequence_length}:{prompt}".encode()).hexdigest()[:16]


def cache_key(
    model: LoadedModel,
    *,
    template_hash: str,
    working_size: tuple[int, int],
    steps: int,
    seed: int,
    guidance: float,
    variant: str,
    warmup_prompt: str,
    max_sequence_length: int,
) -> CacheKey:
    """Build the identity of a warm-up: a job reuses a cache only when every field matches."""
    width, height = working_size
    return CacheKey(
        template_hash=template_hash,
        model_id=model.model_id,
        model_revision=model.revision,
        width=width,
        height=height,
        steps=steps,
        scheduler_hash=scheduler_hash(model),
        seed=seed,
        guidance=float(guidance),
        dtype=str(model.dtype).removeprefix("torch."),
        variant=variant,  # type: ignore[arg-type]
        prompt_hash=prompt_hash(warmup_prompt, max_sequence_length),
    )


def load_activations(key: CacheKey) -> TemplateActivations | None:
    """Return the cached activations for ``key`` from memory or disk, or None on a miss."""
    entry = get_store().get(key)
    if entry is None:
        return None
    try:
        metadata = ActivationsMetadata.from_strings(dict(entry.meta.extra))
        tensors = {name: entry.decode(name) for name in entry.names()}
        return TemplateActivations.from_tensors(tensors, metadata)
    except (KeyError, ValueError):
        # An entry written by another engine version: drop it and treat the request as a miss.
        logger.exception("cache entry %s is unreadable; dropping it", key.short())
        get_store().drop(key)
        return None


def save_activations(key: CacheKey, activations: TemplateActivations) -> tuple[str, int]:
    """Store a warm-up's activations; return the tier it landed in and its encoded size in bytes."""
    store = get_store()
    metadata = activations.metadata
    tensors = activations.to_tensors()
    tier = store.put_tensors(
        key,
        tensors,
        steps=metadata.num_steps,
        blocks=metadata.num_blocks,
        extra=metadata.to_strings(),
    )
    return tier or "none", encoded_nbytes_of(tensors, store.codec)
