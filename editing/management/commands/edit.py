"""Edit an image from the command line through the same queue and workers as the API."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from editing import catalog, imaging, services
from editing.models import EditJob, JobStatus, Template
from editing.params import generation_error
from editor_site.celery import app as celery_app

POLL_INTERVAL_S = 0.5
WORKER_CHECK_INTERVAL_S = 15.0
# Errors from asking the workers for their queues while the broker is down or moved to another port.
BROKER_ERRORS = (OSError, RedisError, OperationalError)


def live_queues(timeout_s: float = 2.0) -> set[str]:
    """Names of the queues that at least one live worker consumes."""
    replies = celery_app.control.inspect(timeout=timeout_s).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues}


class Command(BaseCommand):
    help = "Submit an edit job, show its progress and write the result (uses the stack that 'make run' started)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--image", required=True, type=Path, help="Template image file.")
        parser.add_argument("--mask", required=True, type=Path, help="Mask image of the same size; white = edit.")
        parser.add_argument("--prompt", required=True, help="What the masked region should show.")
        parser.add_argument("--out", required=True, type=Path, help="Where to write the edited PNG.")
        parser.add_argument("--steps", type=int, default=settings.EDITOR_DEFAULT_STEPS, help="Denoising steps.")
        parser.add_argument("--seed", type=int, default=settings.EDITOR_DEFAULT_SEED, help="Random seed.")
        parser.add_argument("--guidance", type=float, default=30.0, help="Guidance scale.")
        parser.add_argument("--user", default="demo", help="Owner of the template and job (default: demo).")
        parser.add_argument("--model", default="", help="Served model name (default: the first in EDITOR_MODELS).")

    def handle(self, *args, **options) -> None:
        service_logger = logging.getLogger("editing")
        level = service_logger.level
        if options["verbosity"] < 2:
            # The service logs what this command prints (a rejected upload, a submitted job) at INFO on
            # stderr; -v 2 shows those lines too.
            service_logger.setLevel(logging.WARNING)
        try:
            self.edit(options)
        finally:
            service_logger.setLevel(level)

    def edit(self, options: dict) -> None:
        error = generation_error(seed=options["seed"], steps=options["steps"], guidance=options["guidance"])
        if error is not None:
            raise CommandError(f"--{error[1]}")
        prompt = options["prompt"].strip()
        if not prompt:
            raise CommandError("--prompt is empty; describe what the masked region should show.")

        owner = get_user_model().objects.filter(username=options["user"]).first()
        if owner is None:
            raise CommandError(
                f"User '{options['user']}' does not exist; pass --user with an existing user name "
                "('make run' creates the user 'demo')."
            )
        model = catalog.get(options["model"]) if options["model"] else catalog.default_model()
        if model is None:
            raise CommandError(f"--model {options['model']!r} is not served; use one of {catalog.names()}.")
        image, mask = self.read_inputs(options["image"], options["mask"])
        self.check_output_path(options["out"])

        if not celery_app.conf.broker_url:
            raise CommandError("No Redis broker is configured: start the stack with 'make run' or set REDIS_URL.")
        job_queue = services.queue_for_mask(mask, model)
        try:
            queues = live_queues()
        except BROKER_ERRORS as error:
            raise CommandError(f"Cannot reach the Redis broker at {celery_app.conf.broker_url}: {error}") from None
        if job_queue not in queues:
            raise CommandError(
                f"No live worker serves queue {job_queue}; start the stack with 'make run' (or a worker with -Q {job_queue})."
            )

        template = self.find_or_create_template(owner, options["image"].stem, image)
        job = services.submit_job(
            owner=owner, template=template, mask=mask, prompt=prompt,
            seed=options["seed"], steps=options["steps"], guidance=options["guidance"], model=model.name,
        )
        self.stdout.write(f"Job {job.pk} queued on {job.queue_name} (mask ratio {job.mask_ratio:.3f}).")
        job = self.wait(job)
        if job.status != JobStatus.SUCCEEDED:
            raise CommandError(f"Job {job.pk} {job.status}: {job.error_text or 'no error message'}")
        with job.result.open("rb") as handle:
            png = handle.read()
        try:
            options["out"].write_bytes(png)
        except OSError as error:
            raise CommandError(
                f"Could not write {options['out']} ({error}); the result stays available at /api/jobs/{job.pk}/result/."
            ) from None
        timings = " ".join(f"{phase}={ms:.0f}ms" for phase, ms in job.timings.items())
        self.stdout.write(self.style.SUCCESS(f"Wrote {options['out']} ({timings})"))

    def read_inputs(self, image_path: Path, mask_path: Path):
        for label, path in (("--image", image_path), ("--mask", mask_path)):
            if not path.is_file():
                raise CommandError(f"{label} {path} does not exist or is not a file.")
        limits = {"max_pixels": settings.EDITOR_MAX_PIXELS, "max_bytes": settings.EDITOR_MAX_UPLOAD_BYTES}
        try:
            image = imaging.read_template(image_path.read_bytes(), **limits)
            imaging.check_template_shape(image.shape[1], image.shape[0])
            mask = imaging.read_mask(mask_path.read_bytes(), size=(image.shape[1], image.shape[0]), **limits)
        except imaging.ImageRuleError as error:
            option, path = ("--mask", mask_path) if error.field == "mask" else ("--image", image_path)
            raise CommandError(f"{option} {path}: {error}") from None
        return image, mask

    def check_output_path(self, out: Path) -> None:
        """Reject an --out that cannot be written before the job is submitted; create its folder if missing."""
        if out.is_dir():
            raise CommandError(f"--out {out} is a folder; give a file path such as {out / 'edited.png'}.")
        folder = out.parent
        if not folder.is_dir():
            try:
                folder.mkdir(parents=True)
            except OSError as error:
                raise CommandError(f"--out {out}: cannot create the folder {folder} ({error}); choose a writable path.") from None
            self.stdout.write(f"Created the folder {folder} for --out.")
        if not os.access(folder, os.W_OK):
            raise CommandError(f"--out {out}: the folder {folder} is not writable; choose a writable path.")

    def find_or_create_template(self, owner, name: str, image) -> Template:
        existing = Template.objects.filter(owner=owner, content_hash=services.content_hash(image)).first()
        return existing or services.create_template(owner=owner, name=name, image=image)

    def wait(self, job: EditJob) -> EditJob:
        last_line = ""
        terminal = self.stdout.isatty()
        broker_lost = False
        next_worker_check = time.monotonic() + WORKER_CHECK_INTERVAL_S
        while True:
            job.refresh_from_db()
            line = f"{job.status}: {job.progress * 100:5.1f}%"
            if job.is_final:
                # The last poll may have caught the final step before the result was stored.
                self.stdout.write(f"\r{line}" if terminal else line)
                return job
            if job.status == JobStatus.QUEUED:
                line += f" ({services.queue_position(job)} ahead)"
            if line != last_line:
                # A terminal shows one line that updates in place, and a pipe or file gets one line per change.
                if terminal:
                    self.stdout.write(f"\r{line}", ending="")
                    self.stdout.flush()
                else:
                    self.stdout.write(line)
                last_line = line
            if time.monotonic() >= next_worker_check and not broker_lost:
                next_worker_check = time.monotonic() + WORKER_CHECK_INTERVAL_S
                try:
                    served = job.queue_name in live_queues()
                except BROKER_ERRORS as error:
                    # The job's row is in the database, so waiting goes on without the broker.
                    broker_lost = True
                    self.stderr.write(
                        f"\nLost the Redis broker at {celery_app.conf.broker_url} ({error}). The job is kept and "
                        "runs again when the stack is back ('make run'); still waiting, Ctrl-C stops waiting."
                    )
                else:
                    if not served:
                        self.stderr.write(f"\nNo live worker serves {job.queue_name}; the job waits until one starts.")
            time.sleep(POLL_INTERVAL_S)
