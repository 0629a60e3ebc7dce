"""Celery tasks. They are thin: take ids, re-fetch, and delegate to ``workers.execution``."""

from __future__ import annotations

import logging

from celery import shared_task

from workers import heartbeat  # noqa: F401 - connects the heartbeat to the worker signals
from workers import residency  # noqa: F401 - connects the cache tier reconciliation to the worker signals

logger = logging.getLogger(__name__)

# A job whose database connection failed is re-sent after this delay, at most this many times.
DATABASE_RETRY_DELAY_S = 2
DATABASE_MAX_RETRIES = 3


@shared_task(
    name="workers.tasks.run_edit_job",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_edit_job(self, job_id: str, takeover: bool = False) -> None:
    """Run one edit job; ``takeover`` lets this delivery restart the job while it is still ``running``.

    Soft and hard time limits come from CELERY_TASK_SOFT_TIME_LIMIT and CELERY_TASK_TIME_LIMIT unless
    the message sets its own.
    """
    # Imported here so that the web process, which only sends this task by name, never loads torch.
    from workers.execution import DatabaseConnectionLost, execute_job

    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    soft_limit = (self.request.timelimit or (None, None))[1]
    try:
        execute_job(
            job_id, worker=self.request.hostname or "worker", redelivered=redelivered or takeover,
            soft_time_limit_s=float(soft_limit) if soft_limit else None,
        )
    except DatabaseConnectionLost as error:
        # Only this worker held the job, so the re-sent message may take it over. Beyond the retry
        # limit the job stays running until the reconciler finds it stale.
        logger.warning("re-sending job %s in %d s after a database error", job_id, DATABASE_RETRY_DELAY_S)
        raise self.retry(
            args=[job_id], kwargs={"takeover": True}, countdown=DATABASE_RETRY_DELAY_S,
            max_retries=DATABASE_MAX_RETRIES, exc=error,
        ) from error


@shared_task(
    name="workers.tasks.run_warmup",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_warmup(self, warmup_id: int) -> None:
    from workers.execution import execute_warmup

    execute_warmup(warmup_id, worker=self.request.hostname or "worker")


@shared_task(name="workers.tasks.drop_cache_entries", bind=True, ignore_result=True)
def drop_cache_entries(self, digests: list[str]) -> None:
    """Remove these cache entries (key digests) from this worker's memory and disk tiers.

    The web side sends one message to the own queue of every live worker when a drop or a template
    deletion leaves entries that no valid warm-up vouches for.
    """
    from django.db import close_old_connections

    close_old_connections()
    residency.drop_entries(self.request.hostname or "worker", digests)
