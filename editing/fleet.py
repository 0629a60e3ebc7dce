"""The live workers, as their heartbeats in Redis describe them (see workers/heartbeat.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

from editor_site import redis_keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerState:
    hostname: str
    models: tuple[str, ...]
    queues: tuple[str, ...]
    started_at: float | None = None  # epoch seconds; None from workers that do not publish it


def live_workers() -> list[WorkerState] | None:
    """Workers whose heartbeat has not expired; None when Redis cannot be read."""
    try:
        client = redis_keys.client()
        keys = list(client.scan_iter(match=redis_keys.worker_state_pattern(), count=100))
        values = client.mget(keys) if keys else []
    except (redis.RedisError, ValueError):
        logger.warning("could not read worker heartbeats", exc_info=True)
        return None
    workers = []
    for raw in values:
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            record = json.loads(raw)
            workers.append(
                WorkerState(
                    str(record["hostname"]), tuple(record["models"]), tuple(record.get("queues", ())),
                    record.get("started_at"),
                )
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed worker heartbeat: %r", raw[:200])
    return workers


def unserved(model: str) -> bool:
    """True when live workers are known and none of them serves `model`.

    With no live worker at all (the fleet is restarting) or no Redis, jobs are accepted and wait in their
    queue, as every job does while its workers are down.
    """
    workers = live_workers()
    if not workers:
        return False
    return all(model not in worker.models for worker in workers)


def process_restarted(hostname: str, since: float, workers: list[WorkerState]) -> bool:
    """True when the live heartbeat of `hostname` comes from a process started after `since` (epoch seconds).

    The process that was running at `since` is then certainly gone, unlike a missing heartbeat, which a
    slow publish can also cause.
    """
    match = next((worker for worker in workers if worker.hostname == hostname), None)
    return match is not None and match.started_at is not None and match.started_at > since


def process_gone(hostname: str, since: float, workers: list[WorkerState] | None = None) -> bool:
    """True when no worker process that was running at `since` (epoch seconds) still serves as `hostname`.

    That is the case when `hostname` has no live heartbeat, or its live process started after `since` (a
    restart under the same name). False when Redis cannot be read or the worker does not publish its start.
    `workers` is a list already read with `live_workers()`.
    """
    workers = live_workers() if workers is None else workers
    if workers is None:
        return False
    if all(worker.hostname != hostname for worker in workers):
        return True
    return process_restarted(hostname, since, workers)
