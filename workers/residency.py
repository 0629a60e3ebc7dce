"""Keeping the cache tier of warm-up records true to the entries this worker process stores.

A `CacheWarmup` row names the worker that stored its entry and the tier the entry landed in. Host memory
does not survive the process, while disk files do unless evicted, so a job process that starts under a
worker's name updates the rows that name the worker to the tiers its store contains (`reconcile_tiers`).
After each job and warm-up the rows of entries evicted from memory meanwhile move to `disk` or `none`, and
those of entries evicted from disk (for room or as corrupt files) to `memory` or `none`
(`record_evictions`). An operator's drop and the deletion of a template's last warm-up for a key send this
worker the key digests to remove from both tiers (`drop_entries`, run by the `workers.tasks.drop_cache_entries` task).

NOTE: this assumes one job process per worker name, as the threads pool and prefork with concurrency 1
(the stack's default) give. With more prefork children, each child has its own memory tier, and a child
that starts marks the memory entries of its siblings as not held by it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready
from django.db import DatabaseError, close_old_connections

from editing import catalog, warmups
from editing.models import CacheTier, CacheWarmup, JobStatus

# The store, load record and metrics modules import torch. The functions import them, so the main process
# of a prefork worker, which imports this module for its signal receivers, does not load torch.

logger = logging.getLogger(__name__)

# The worker's name, set in the main process before the pool starts, so prefork children inherit it.
_hostname: str | None = None


def reconcile_tiers(hostname: str) -> dict[str, int]:
    """Set the tier of the warm-up records naming `hostname` to the tier this process's store contains.

    Entries that no valid warm-up vouches for any more (dropped, or their template deleted) are removed
    from the disk tier on the way, so a worker that was down during the drop frees them too. The entries
    found are listed in this process's load record. Returns the number of records moved to each tier.
    """
    from workers import worker_state
    from workers.template_cache import get_store

    store = get_store()
    records = (
        CacheWarmup.objects.filter(
            worker=hostname, status=JobStatus.SUCCEEDED, cache_tier__in=[CacheTier.MEMORY, CacheTier.DISK]
        )
        .exclude(cache_key="")
        .select_related("template")
    )
    records = list(records)
    vouched = set(
        warmups.valid_warmups().filter(cache_key__in={record.cache_key for record in records})
        .values_list("cache_key", flat=True)
    )
    moved: dict[str, list[int]] = {tier: [] for tier in CacheTier.values}
    for record in records:
        if record.cache_key not in vouched:
            store.drop_digest(record.cache_key)
        tier = store.tier_of_digest(record.cache_key) or CacheTier.NONE
        if tier != CacheTier.NONE:
            model = record.model or catalog.default_model().name
            token = worker_state.warmup_residency_token(
                model, record.template.content_hash, record.steps, record.seed, record.guidance
            )
            worker_state.remember_entry(token, record.cache_key)
        if tier != record.cache_tier:
            moved[tier].append(record.pk)
    counts = {}
    for tier, pks in moved.items():
        if pks:
            counts[tier] = CacheWarmup.objects.filter(pk__in=pks).update(cache_tier=tier)
    logger.info(
        "cache tiers of %s reconciled: %d warm-up records checked, moved %s",
        hostname, len(records), counts or "none",
    )
    return counts


def record_evictions(hostname: str) -> dict[str, int]:
    """Set the tier of the records naming `hostname` whose entries this process evicted from a tier.

    An entry evicted from memory is on disk when the disk tier took it, else gone. One evicted from disk
    is in memory when it is still resident there, else gone. Best effort: after a database error,
    which is logged, the records keep their tier until the worker restarts. Returns the records moved per tier.
    """
    from workers.template_cache import get_store

    store = get_store()
    digests = store.take_evicted_digests()
    counts: dict[str, int] = {}
    try:
        for digest in digests:
            tier = store.tier_of_digest(digest) or CacheTier.NONE
            moved = (
                CacheWarmup.objects.filter(worker=hostname, status=JobStatus.SUCCEEDED, cache_key=digest)
                .exclude(cache_tier=tier)
                .update(cache_tier=tier)
            )
            if moved:
                counts[tier] = counts.get(tier, 0) + moved
    except DatabaseError as error:
        logger.warning(
            "could not record the tiers of %d evicted cache entries of %s: %s", len(digests), hostname, error
        )
        return counts
    if counts:
        logger.info("cache entries of %s evicted: records moved %s", hostname, counts)
    return counts


def drop_entries(hostname: str, digests: Iterable[str]) -> list[str]:
    """Remove the entries with these key digests from this process's memory and disk tiers.

    A digest that a valid warm-up vouches for again (the same image uploaded and warmed meanwhile) is kept.
    The records naming `hostname` with a removed digest get tier `none`. Returns the digests removed.
    """
    from workers import worker_state
    from workers.metrics_publisher import publish_metrics
    from workers.template_cache import get_store

    requested = set(digests)
    vouched = set(warmups.valid_warmups().filter(cache_key__in=requested).values_list("cache_key", flat=True))
    store = get_store()
    removed = sorted(digest for digest in requested - vouched if store.drop_digest(digest))
    CacheWarmup.objects.filter(worker=hostname, cache_key__in=requested - vouched).exclude(
        cache_tier=CacheTier.NONE
    ).update(cache_tier=CacheTier.NONE)
    logger.info(
        "cache entries dropped on %s: %d of %d requested (%s), %d kept because a valid warm-up vouches for them",
        hostname, len(removed), len(requested), ", ".join(digest[:12] for digest in removed) or "none held",
        len(requested & vouched),
    )
    if removed:
        worker_state.publish(hostname, keep_published_costs=True)
        publish_metrics(hostname)
    return removed


def reconcile_on_start(hostname: str) -> None:
    """Reconcile the tiers and publish the load record; a failure is logged and the worker runs on."""
    from workers import worker_state

    try:
        close_old_connections()
        reconcile_tiers(hostname)
    except DatabaseError:
        logger.exception("could not reconcile the cache tiers of %s; its warm-up records may name gone entries",
                         hostname)
        return
    worker_state.publish(hostname, keep_published_costs=True)


@celeryd_after_setup.connect
def remember_hostname(sender: str, instance, **_kwargs) -> None:
    global _hostname
    _hostname = sender


@worker_process_init.connect
def reconcile_prefork_child(**_kwargs) -> None:
    """Reconcile in each prefork child as it starts: the children run the jobs and own the stores."""
    if _hostname is not None:
        reconcile_on_start(_hostname)


@worker_ready.connect
def reconcile_single_process(sender=None, **_kwargs) -> None:
    """Reconcile in the main process of a threads or solo pool, which runs the jobs itself."""
    hostname = getattr(sender, "hostname", None) or _hostname
    if hostname is None or isinstance(getattr(sender, "pool", None), PreforkPool):
        return
    reconcile_on_start(hostname)
