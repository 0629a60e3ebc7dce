"""Faults against batching workers, which run Celery's threads pool (EDITOR_ENGINE_MAX_BATCH above 1).

The threads pool reconnects to the broker in the same process and runs several jobs in one process, so a
Redis restart and a killed worker are checked here again, on workers of their own and a private Redis.
"""

from __future__ import annotations

import pytest

from editing.models import JobStatus
from editing.routing import all_queues
from tests.test_faults import (
    REQUEUE_AFTER_S,
    STALE_S,
    RedisServer,
    Workers,
    check_killed_worker_job_completes_once,
    check_redis_restart_loses_no_queued_job,
    fault_media,  # noqa: F401 - module fixture used by the tests below
    fault_redis,  # noqa: F401 - module fixture used by the tests below
    fault_settings,  # noqa: F401 - autouse fixture: media root, no warm-ups, no submit limit
    submit_full_mask_job,
    wait_until_final,
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


def test_threads_pool_survives_redis_restart(api_client_for, workers, fault_redis, fault_media):  # noqa: F811
    client = api_client_for("alice")
    check_redis_restart_loses_no_queued_job(client, fault_redis, fault_media)

    # The workers still consume new messages after the restart, not only the re-sent ones.
    (later,) = wait_until_final([submit_full_mask_job(client, steps=2).pk])
    assert later.status == JobStatus.SUCCEEDED, later.error


def test_killed_threads_worker_job_completes_once(api_client_for, workers, fault_media):  # noqa: F811
    check_killed_worker_job_completes_once(api_client_for("alice"), workers, fault_media)
