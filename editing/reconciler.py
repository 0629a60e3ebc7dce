"""Re-sending the Celery messages of jobs and warm-ups that the broker lost or whose worker died.

The database is the source of truth and every claim is a conditional UPDATE, so a message sent twice
runs the job once: the second delivery finds the job claimed and skips it. That makes re-sending safe,
and the reconciler only has to decide when a message is probably missing:

* a job or warm-up ``queued`` for longer than EDITOR_REQUEUE_AFTER_S whose id is in no queue list and
  not in the unacknowledged hash of the broker (Redis lost it on a restart, or the send failed);
* a job or warm-up ``running`` with no progress for EDITOR_STALE_RUNNING_S (its worker died and the
  broker's visibility timeout, 2x the hard time limit, has not yet redelivered the message). The
  worker that receives the re-sent message finds the row stale and takes the job over;
* a job ``queued`` in the own queue of a worker whose heartbeat has expired (the ``cost`` routing policy
  sent it there): it is routed again at once, among the live workers.

A Redis key that expires after EDITOR_REQUEUE_AFTER_S records each re-send, so an object is re-sent at
most once per that interval unless Redis itself lost the key.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from editing import catalog, cost_routing, fleet, jobstate, services, warmups
from editing.models import CacheWarmup, EditJob, JobStatus
from editing.routing import all_queues
from editor_site import redis_keys

logger = logging.getLogger(__name__)

# kombu's Redis transport (5.7) stores a queue's messages of priority 0 in a list named like the queue
# and those of priority p > 0 in "<queue>\x06\x16<p>". Delivered, unacknowledged messages are in the
# hash "unacked". The broker's global key prefix comes first in every name.
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"
# A running job silent this long whose worker has no heartbeat is restarted without waiting to go stale.
# Three heartbeat lifetimes (workers/heartbeat.py), so a worker that was only slow to publish keeps its job.
ORPHAN_SILENT_S = 30


@dataclass
class ReconcileReport:
    """Ids that one reconcile pass re-sent, by reason, and the count of waiting rows that had a message."""

    requeued_jobs: list[str] = field(default_factory=list)
    rerouted_jobs: list[str] = field(default_factory=list)  # from the queue of a worker that is gone
    stale_jobs: list[str] = field(default_factory=list)
    cancelled_stale_jobs: list[str] = field(default_factory=list)  # asked to stop, then their worker went
    orphaned_jobs: list[str] = field(default_factory=list)  # running on a worker process that is gone
    requeued_warmups: list[int] = field(default_factory=list)
    stale_warmups: list[int] = field(default_factory=list)
    in_broker: int = 0

    @property
    def resent(self) -> int:
        return (
            len(self.requeued_jobs) + len(self.rerouted_jobs) + len(self.stale_jobs) + len(self.orphaned_jobs)
            + len(self.requeued_warmups) + len(self.stale_warmups)
        )


def message_argument(raw: bytes) -> str | None:
    """Return the first task argument of a kombu message (job UUID or warm-up id) as text, or None."""
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):
            # Entries of the unacknowledged hash are [message, exchange, routing key].
            payload = payload[0]
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def queue_list_keys(prefix: str, queues: list[str]) -> list[str]:
    keys = []
    for queue in queues:
        keys.append(f"{prefix}{queue}")
        keys.extend(f"{prefix}{queue}{KOMBU_PRIORITY_SEPARATOR}{step}" for step in KOMBU_PRIORITY_STEPS)
    return keys


def broker_arguments(client: redis.Redis, prefix: str, queues: list[str]) -> set[str]:
    """First arguments of every message waiting in ``queues`` or delivered but not yet acknowledged."""
    found: set[str] = set()
    for key in queue_list_keys(prefix, queues):
        for raw in client.lrange(key, 0, -1):
            argument = message_argument(raw)
            if argument is not None:
                found.add(argument)
    for raw in client.hvals(f"{prefix}{KOMBU_UNACKED_KEY}"):
        argument = message_argument(raw)
        if argument is not None:
            found.add(argument)
    return found


def resend_marker_key(prefix: str, kind: str, object_id: object) -> str:
    return f"{prefix}editor:resent:{kind}:{object_id}"


def mark_resent(client: redis.Redis, prefix: str, kind: str, object_id: object, interval_s: int) -> bool:
    """Record a re-send; return False when this object was already re-sent within ``interval_s``."""
    return bool(client.set(resend_marker_key(prefix, kind, object_id), "1", nx=True, ex=interval_s))


def reroute_from_gone_workers(client: redis.Redis, report: ReconcileReport) -> None:
    """Route again the queued jobs waiting in the own queue of a worker whose heartbeat has expired."""
    live = fleet.live_workers()
    if live is None:
        return  # Redis unreadable: nothing is known about the workers
    alive = {worker.hostname for worker in live}
    waiting = EditJob.objects.filter(status=JobStatus.QUEUED, queue_name__startswith=redis_keys.direct_queue(""))
    gone: set[str] = set()
    for job in waiting.select_related("template").order_by("created_at"):
        hostname = cost_routing.hostname_of_direct_queue(job.queue_name)
        if hostname is None or hostname in alive:
            continue
        gone.add(hostname)
        services.reroute(job)
        report.rerouted_jobs.append(str(job.pk))
    for hostname in gone:
        # Its messages now have new copies; a worker restarting under this name must not run them again.
        client.delete(redis_keys.worker_backlog_key(hostname), redis_keys.key_prefix() + redis_keys.direct_queue(hostname))


def reconcile_once(*, requeue_after_s: int | None = None, stale_after_s: int | None = None) -> ReconcileReport:
    """Run one pass over queued and running jobs and warm-ups; raises redis.RedisError when Redis is down."""
    requeue_after_s = requeue_after_s or settings.EDITOR_REQUEUE_AFTER_S
    stale_after_s = stale_after_s or settings.EDITOR_STALE_RUNNING_S
    client = redis_keys.client()
    prefix = redis_keys.key_prefix()
    report = ReconcileReport()
    reroute_from_gone_workers(client, report)
    direct_queues = set(
        EditJob.objects.filter(status=JobStatus.QUEUED, queue_name__startswith=redis_keys.direct_queue(""))
        .values_list("queue_name", flat=True).distinct()
    )
    in_broker = broker_arguments(client, prefix, all_queues(catalog.names()) + sorted(direct_queues))
    now = timezone.now()
    queued_before = now - timedelta(seconds=requeue_after_s)
    stale_before = now - timedelta(seconds=stale_after_s)

    queued_jobs = EditJob.objects.filter(status=JobStatus.QUEUED, updated_at__lt=queued_before, cancel_requested=False)
    for job in queued_jobs.order_by("created_at"):
        if str(job.pk) in in_broker:
            report.in_broker += 1
        elif mark_resent(client, prefix, "job", job.pk, requeue_after_s):
            services.enqueue(job)
            report.requeued_jobs.append(str(job.pk))
    reclaim_orphans(client, prefix, now, stale_before, requeue_after_s, report)
    for job in EditJob.objects.filter(status=JobStatus.RUNNING, updated_at__lt=stale_before).order_by("created_at"):
        if job.cancel_requested:
            if jobstate.cancel_stale(job.pk, stale_before):
                report.cancelled_stale_jobs.append(str(job.pk))
            continue
        if mark_resent(client, prefix, "job", job.pk, requeue_after_s):
            services.enqueue(job)
            report.stale_jobs.append(str(job.pk))

    for warmup in CacheWarmup.objects.filter(status=JobStatus.QUEUED, updated_at__lt=queued_before).order_by("pk"):
        if str(warmup.pk) in in_broker:
            report.in_broker += 1
        elif mark_resent(client, prefix, "warmup", warmup.pk, requeue_after_s):
            warmups.enqueue_warmup(warmup)
            report.requeued_warmups.append(warmup.pk)
    for warmup in CacheWarmup.objects.filter(status=JobStatus.RUNNING, updated_at__lt=stale_before).order_by("pk"):
        if mark_resent(client, prefix, "warmup", warmup.pk, requeue_after_s):
            warmups.enqueue_warmup(warmup)
            report.stale_warmups.append(warmup.pk)

    if report.resent:
        logger.warning(
            "reconciler re-sent %d queued jobs %s, re-routed %d jobs of gone workers %s, %d stale running jobs %s, "
            "%d jobs of gone worker processes %s, %d queued warm-ups %s, %d stale warm-ups %s",
            len(report.requeued_jobs), report.requeued_jobs, len(report.rerouted_jobs), report.rerouted_jobs,
            len(report.stale_jobs), report.stale_jobs, len(report.orphaned_jobs), report.orphaned_jobs,
            len(report.requeued_warmups), report.requeued_warmups, len(report.stale_warmups), report.stale_warmups,
        )
    if report.cancelled_stale_jobs:
        logger.warning(
            "reconciler cancelled %d running jobs that were asked to stop and then went silent %s",
            len(report.cancelled_stale_jobs), report.cancelled_stale_jobs,
        )
    return report


def reclaim_orphans(
    client: redis.Redis,
    prefix: str,
    now: datetime,
    stale_before: datetime,
    requeue_after_s: int,
    report: ReconcileReport,
) -> None:
    """Restart (or, when asked to stop, cancel) running jobs whose worker process is gone, before they go stale.

    A worker that stops or restarts mid-job leaves its row `running`. When its worker now has a heartbeat
    from a process started after the claim (a restart under the same name), the job is re-sent as a
    takeover at once. When its worker has no heartbeat, that happens once the job has been silent for
    ORPHAN_SILENT_S. Either way it does not wait EDITOR_STALE_RUNNING_S.
    """
    silent_before = now - timedelta(seconds=ORPHAN_SILENT_S)
    candidates = EditJob.objects.filter(
        status=JobStatus.RUNNING, updated_at__gte=stale_before, started_at__isnull=False
    ).exclude(worker="")
    if not candidates.exists():
        return
    workers = fleet.live_workers()
    if workers is None:
        return  # Redis cannot be read: leave the jobs to the stale rule
    for job in candidates.order_by("created_at"):
        claimed_at = job.started_at.timestamp()
        if fleet.process_restarted(job.worker, claimed_at, workers):
            quiet_since = now
        elif job.updated_at < silent_before and fleet.process_gone(job.worker, claimed_at, workers):
            quiet_since = silent_before
        else:
            continue
        if job.cancel_requested:
            if jobstate.cancel_stale(job.pk, quiet_since):
                report.cancelled_stale_jobs.append(str(job.pk))
        elif mark_resent(client, prefix, "job", job.pk, requeue_after_s):
            services.enqueue(job, takeover=True)
            report.orphaned_jobs.append(str(job.pk))


def run_forever(interval_s: float, stop: threading.Event | None = None) -> None:
    """Reconcile every ``interval_s`` seconds until ``stop`` is set; broker and database errors are
    logged and the next pass tries again."""
    stop = stop or threading.Event()
    logger.info("reconciler started: every %.0f s, requeue after %d s, stale after %d s",
                interval_s, settings.EDITOR_REQUEUE_AFTER_S, settings.EDITOR_STALE_RUNNING_S)
    while not stop.is_set():
        close_old_connections()
        try:
            reconcile_once()
        except (redis.RedisError, DatabaseError, ValueError) as error:
            logger.error("reconcile pass failed (%s: %s); retrying in %.0f s", type(error).__name__, error, interval_s)
        stop.wait(interval_s)
    logger.info("reconciler stopped")
