"""A worker's heartbeat in Redis: which models it serves and on which queues, refreshed every few seconds.

The web side reads these records to reject jobs for models that no live worker serves. A record expires
a few seconds after its worker stops refreshing it, so a killed worker drops out without cleanup.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
from django.conf import settings

from editing.routing import all_queues
from editor_site import redis_keys

logger = logging.getLogger(__name__)

INTERVAL_S = 3.0
# Several missed refreshes in a row before the record expires; a busy Redis may delay one.
TTL_S = 10
# When this worker process started; a job claimed before it ran in an earlier process of the same name.
STARTED_AT = time.time()

_stop = threading.Event()
_thread: threading.Thread | None = None


def state(hostname: str) -> dict[str, object]:
    return {
        "hostname": hostname,
        "models": list(settings.EDITOR_WORKER_MODELS),
        "queues": all_queues(),
        "direct_queue": redis_keys.direct_queue(hostname),
        "pid": os.getpid(),
        "started_at": STARTED_AT,
        "at": time.time(),
    }


def publish(hostname: str) -> None:
    redis_keys.client().set(redis_keys.worker_state_key(hostname), json.dumps(state(hostname)), ex=TTL_S)


def _beat(hostname: str) -> None:
    while not _stop.is_set():
        try:
            publish(hostname)
        except (redis.RedisError, ValueError):
            logger.warning("could not publish the heartbeat of %s", hostname, exc_info=True)
        _stop.wait(INTERVAL_S)


@celeryd_after_setup.connect
def consume_direct_queue(sender: str, instance, **_kwargs) -> None:
    """Also consume this worker's own queue, where the cost routing policy sends the jobs it picks it for."""
    instance.app.amqp.queues.select_add(redis_keys.direct_queue(sender))


@worker_ready.connect
def start_heartbeat(sender=None, **_kwargs) -> None:
    global _thread
    hostname = getattr(sender, "hostname", None) or f"worker@{os.uname().nodename}"
    _stop.clear()
    _thread = threading.Thread(target=_beat, args=(hostname,), name="editor-heartbeat", daemon=True)
    _thread.start()
    logger.info("heartbeat of %s started: models %s", hostname, settings.EDITOR_WORKER_MODELS)


@worker_shutdown.connect
def stop_heartbeat(sender=None, **_kwargs) -> None:
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        try:
            redis_keys.client().delete(redis_keys.worker_state_key(hostname))
        except (redis.RedisError, ValueError) as error:
            # Usual when the whole stack stops and Redis goes first; the heartbeat key expires by itself.
            logger.warning(
                "could not remove the heartbeat of %s (%s: %s); it expires in %d s",
                hostname, type(error).__name__, error, TTL_S,
            )
