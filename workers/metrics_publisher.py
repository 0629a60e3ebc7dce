"""Publishing a worker's cache metrics to Redis, where the web side's /metrics endpoint reads them."""

from __future__ import annotations

import logging

import redis

from editor_site import redis_keys
from workers.batching import engines
from workers.template_cache import get_store
from workers.worker_state import loaded_cost_models

logger = logging.getLogger(__name__)

# A snapshot older than this belongs to a worker that stopped; Redis drops it.
SNAPSHOT_TTL_S = 600


def publish_metrics(hostname: str) -> None:
    """Store this process's metrics in the Prometheus text format under the worker's key."""
    text = get_store().metrics.render_prometheus()
    for name, model in loaded_cost_models().items():
        text += model.render_prometheus(name)
    for name, engine in engines().items():
        text += engine.stats.render_prometheus(name)
    try:
        redis_keys.client().set(redis_keys.worker_metrics_key(hostname), text, ex=SNAPSHOT_TTL_S)
    except (redis.RedisError, ValueError):
        # Metrics are best effort: a broker hiccup must not fail the job that just finished.
        logger.warning("could not publish cache metrics of %s", hostname, exc_info=True)
