"""Run the whole service locally: database, demo data, Redis, a Celery worker and the web server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from editing.routing import all_queues
from editor_site.broker import embedded_url_file
from editor_site.stack import (
    CELERY_COLD_SHUTDOWN,
    ProcessGroup,
    port_in_use,
    start_embedded_redis,
    wait_for_port,
    worker_command,
)

logger = logging.getLogger(__name__)


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Command(BaseCommand):
    help = (
        "Migrate, load the demo templates, start Redis (embedded unless REDIS_URL is set), a worker, the job "
        "reconciler and the web server."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")),
                            help="Web server port on 127.0.0.1 (default: $PORT or 8000).")
        parser.add_argument("--no-worker", action="store_true", help="Do not start a Celery worker.")

    def handle(self, *args, port: int, no_worker: bool, **options) -> None:
        if port_in_use(port):
            raise CommandError(f"Port {port} on 127.0.0.1 is already in use; stop that server or set PORT to a free port.")
        var_dir = settings.VAR_DIR
        var_dir.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Preparing the model (the built-in demo model is built once under var/)...")
        if settings.EDITOR_MODEL in ("", "demo"):
            from workers.demo_model import ensure_demo_model

            ensure_demo_model(var_dir / "models", "demo")

        # `kill` and service managers send SIGTERM; stop the children as Ctrl-C does.
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        group = ProcessGroup()
        env = os.environ.copy()
        url_file = embedded_url_file(var_dir)
        try:
            if not os.environ.get("REDIS_URL"):
                redis_process, redis_url = start_embedded_redis(var_dir)
                group.adopt("embedded redis", redis_process, stop_last=True)
                url_file.write_text(redis_url)
                env["REDIS_URL"] = redis_url
                self.stdout.write(f"Embedded Redis at {redis_url}")
            # In a child with the stack's environment, so the demo templates' warm-ups reach the broker now
            # rather than when the reconciler finds them queued.
            loaded = subprocess.run([sys.executable, "manage.py", "load_demo_templates"], env=env)
            if loaded.returncode != 0:
                raise CommandError(f"Loading the demo templates failed with exit code {loaded.returncode}; see the output above.")
            if not no_worker:
                group.start("celery worker", worker_command(all_queues()), env=env, leader_signal=CELERY_COLD_SHUTDOWN)
            # Re-sends jobs that Redis lost or whose worker died (see editing.reconciler).
            group.start("reconciler", [sys.executable, "manage.py", "reconcile_jobs", "--interval", "10"], env=env)
            web = group.start(
                "web server",
                [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                env=env,
            )
            wait_for_port(port, timeout_s=60, process=web)
            self.stdout.write(self.style.SUCCESS(f"Editing service running at http://127.0.0.1:{port}/"))
            self.stdout.write("Log in as demo / demo. Press Ctrl-C to stop.")
            while (exited := group.first_exited()) is None:
                time.sleep(0.5)
            self.stderr.write(f"{exited[0]} exited with code {exited[1]}; stopping the stack.")
        except KeyboardInterrupt:
            self.stdout.write("Stopping...")
        finally:
            group.stop()
            url_file.unlink(missing_ok=True)
