"""Re-send the messages of queued jobs that the broker lost and of running jobs whose worker died."""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand, CommandError, CommandParser

from editing import reconciler


class Command(BaseCommand):
    help = (
        "Re-send the Celery message of every job or warm-up queued for longer than EDITOR_REQUEUE_AFTER_S "
        "with no message in Redis, and of every running one without progress for EDITOR_STALE_RUNNING_S."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--once", action="store_true", help="Run one pass and exit (the default is a loop).")
        mode.add_argument("--interval", type=float, default=30.0, metavar="S",
                          help="Seconds between passes in loop mode (default 30).")

    def handle(self, *args, once: bool, interval: float, **options) -> None:
        if once:
            try:
                report = reconciler.reconcile_once()
            except Exception as error:  # noqa: BLE001 - reported to the operator as a command error
                raise CommandError(f"Reconcile pass failed: {type(error).__name__}: {error}") from error
            self.stdout.write(
                f"re-sent {len(report.requeued_jobs)} queued and {len(report.stale_jobs)} stale jobs, "
                f"{len(report.requeued_warmups)} queued and {len(report.stale_warmups)} stale warm-ups; "
                f"{report.in_broker} waiting rows already had a message"
            )
            return
        if interval <= 0:
            raise CommandError(f"--interval must be a positive number of seconds; got {interval}.")
        stop = threading.Event()
        # SIGTERM (docker stop, the stack's shutdown) ends the loop after the current pass.
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        try:
            reconciler.run_forever(interval, stop)
        except KeyboardInterrupt:
            stop.set()
