"""Redis keys that the web side and the workers share beside the Celery broker's own keys.

They live on the broker's Redis server, under the same key prefix as the broker's keys.
"""

from __future__ import annotations

import redis

from editor_site.celery import app as celery_app


def key_prefix() -> str:
    return str((celery_app.conf.broker_transport_options or {}).get("global_keyprefix", ""))


def worker_metrics_key(hostname: str) -> str:
    return f"{key_prefix()}editor:metrics:{hostname}"


def client() -> redis.Redis:
    """Connect to the broker's Redis server; raise ValueError when no broker is configured."""
    url = celery_app.conf.broker_url
    if not url:
        raise ValueError("no Redis broker is configured; set REDIS_URL or start the stack with 'make run'")
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def worker_state_key(hostname: str) -> str:
    return f"{key_prefix()}editor:worker:{hostname}"


def worker_state_pattern() -> str:
    return f"{key_prefix()}editor:worker:*"


def worker_load_key(hostname: str) -> str:
    """The job process's state: when it will be free, its cost fits, the caches it holds."""
    return f"{key_prefix()}editor:load:{hostname}"


def worker_backlog_key(hostname: str) -> str:
    """Hash of job id -> predicted seconds for jobs routed to the worker and not yet started."""
    return f"{key_prefix()}editor:backlog:{hostname}"


def direct_queue(hostname: str) -> str:
    """The queue only this worker consumes; the cost routing policy sends jobs there."""
    return f"edit.direct.{hostname}"
