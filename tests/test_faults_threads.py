"""Faults against batching workers, which run Celery's threads pool (EDITOR_ENGINE_MAX_BATCH above 1).

A killed threads-pool worker is checked here again, on workers of their own and a private Redis.
NOTE: no Redis-restart test runs here. With kombu 5.7.0 a threads-pool worker can exit with
"Unrecoverable error: AttributeError" when it restores unacknowledged messages on the broken channel,
so after a broker restart such a worker needs its supervisor to start it again (docs/reliability.md).
"""

from __future__ import annotations

import pytest

from editing.routing import all_queues
from tests.test_faults import (
    REQUEUE_AFTER_S,
    STALE_S,
    RedisServer,
    Workers,
    check_killed_worker_job_completes_once,
    fault_media,  # noqa: F401 - module fixture used by the tests below
    fault_redis,  # noqa: F401 - module fixture used by the workers fixture
    fault_settings,  # noqa: F401 - autouse fixture: media root, no warm-ups, no submit limit
)

pytestmark = pytest.mark.django_db(transaction=True)

BATCH = 2


@pytest.fixture(scope="module")
def workers(worker_env, fault_redis: RedisServer, fault_media, tmp_path_factory):  # noqa: F811
    env = {
        **worker_env, "REDIS_URL": fault_redis.url, "EDITOR_MEDIA_ROOT": str(fault_media),
        "EDITOR_STALE_RUNNING_S": str(STALE_S), "EDITOR_REQUEUE_AFTER_S": str(REQUEUE_AFTER_S),
        "EDITOR_ENGINE_MAX_BATCH": str(BATCH),
    }
    pool = Workers(env=env, log_dir=tmp_path_factory.mktemp("threads-workers"))
    pool.start("a", all_queues())
    pool.start("b", all_queues())
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.stop_all()


def test_killed_threads_worker_job_completes_once(api_client_for, workers, fault_media):  # noqa: F811
    check_killed_worker_job_completes_once(api_client_for("alice"), workers, fault_media)
