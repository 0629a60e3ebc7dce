"""Celery tasks. They are thin: take ids, re-fetch, and delegate to ``workers.execution``."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(
    name="workers.tasks.run_edit_job",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_edit_job(self, job_id: str) -> None:
    # Imported here so that the web process, which only sends this task by name, never loads torch.
    from workers.execution import execute_job

    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    execute_job(job_id, worker=self.request.hostname or "worker", redelivered=redelivered)


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
