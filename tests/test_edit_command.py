"""The `manage.py edit` command: submit through the queue, wait, write the result."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from editing import imaging
from tests.conftest import PHOTOS, ROOT, png_bytes, stroke_mask


@pytest.fixture
def demo_user(make_user):
    return make_user("demo")


@pytest.fixture
def mask_file(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(png_bytes(stroke_mask(600, 400)))
    return path


@pytest.mark.django_db(transaction=True)
def test_edit_writes_result(celery_worker_process, demo_user, mask_file, tmp_path, settings):
    settings.EDITOR_WARMUP_ON_CREATE = False
    out = tmp_path / "out" / "edited.png"
    stdout = StringIO()
    call_command(
        "edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="a blue cup", out=out, steps=3,
        stdout=stdout,
    )
    result = np.asarray(Image.open(out).convert("RGB"))
    original = imaging.read_template((PHOTOS / "coffee.png").read_bytes(), max_pixels=10**8, max_bytes=10**8)
    assert result.shape == original.shape
    outside = ~imaging.dilate(np.asarray(Image.open(mask_file)) > 127, 16)
    assert np.array_equal(result[outside], original[outside])
    assert "Wrote" in stdout.getvalue()
    assert "succeeded: 100.0%" in stdout.getvalue()


@pytest.mark.django_db(transaction=True)
def test_edit_runs_without_debug_or_allowed_hosts(celery_worker_process, worker_env, demo_user, mask_file, tmp_path):
    """The command line, with production settings that name no host: only the web server needs ALLOWED_HOSTS."""
    env = {key: value for key, value in worker_env.items() if key not in ("DEBUG", "ALLOWED_HOSTS")}
    env.update({"SECRET_KEY": secrets.token_urlsafe(64), "EDITOR_WARMUP_ON_CREATE": "0"})
    out = tmp_path / "edited.png"
    command = [
        sys.executable, "manage.py", "edit", "--image", str(PHOTOS / "coffee.png"), "--mask", str(mask_file),
        "--prompt", "a blue cup", "--out", str(out), "--steps", "2",
    ]

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALLOWED_HOSTS" not in result.stderr
    assert "Wrote" in result.stdout
    assert Image.open(out).size == (600, 400)


@pytest.mark.django_db(transaction=True)
def test_edit_without_worker_says_so(redis_url, demo_user, mask_file, tmp_path, settings, media_root):
    from editing.models import EditJob

    # The job's queue becomes edit.flux.m20, which no worker of this test run consumes.
    settings.EDITOR_BUCKET_EDGES = [0.2, 1.0]
    with pytest.raises(CommandError, match="No live worker"):
        call_command("edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="x", out=tmp_path / "o.png")
    assert EditJob.objects.count() == 0


@pytest.mark.django_db
def test_edit_rejects_missing_file(demo_user, mask_file, tmp_path, settings):
    with pytest.raises(CommandError, match="does not exist"):
        call_command("edit", image=tmp_path / "nope.png", mask=mask_file, prompt="x", out=tmp_path / "o.png")


@pytest.mark.django_db
def test_edit_rejects_wrong_size_mask(demo_user, tmp_path, settings):
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(stroke_mask(100, 50)))
    with pytest.raises(CommandError, match=f"^--mask {small}: "):
        call_command("edit", image=PHOTOS / "coffee.png", mask=small, prompt="x", out=tmp_path / "o.png")


@pytest.mark.django_db
def test_edit_names_option_of_unreadable_image(demo_user, mask_file, tmp_path, caplog):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    caplog.set_level(logging.INFO)
    with pytest.raises(CommandError, match=f"^--image {text}: "):
        call_command("edit", image=text, mask=mask_file, prompt="x", out=tmp_path / "o.png")

    # The service's INFO line about the rejected upload repeats the error; -v 2 would show it.
    assert not [record for record in caplog.records if record.name.startswith("editing")]
    assert logging.getLogger("editing").level == logging.NOTSET


@pytest.mark.django_db
def test_edit_rejects_bad_steps(demo_user, mask_file, tmp_path, settings):
    with pytest.raises(CommandError, match="--steps"):
        call_command(
            "edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="x", out=tmp_path / "o.png", steps=0
        )


@pytest.mark.django_db
@pytest.mark.parametrize("guidance", [float("inf"), float("nan"), -1.0, 100.5])
def test_edit_rejects_bad_guidance(demo_user, mask_file, tmp_path, guidance):
    with pytest.raises(CommandError, match="--guidance must be a finite number between 0 and 100"):
        call_command(
            "edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="x", out=tmp_path / "o.png", guidance=guidance
        )
    assert not tmp_path.joinpath("o.png").exists()


@pytest.mark.django_db
def test_services_reject_unstorable_guidance(demo_user):
    from editing import services, warmups

    image = imaging.read_template((PHOTOS / "coffee.png").read_bytes(), max_pixels=10**7, max_bytes=10**8)
    template = services.create_template(owner=demo_user, name="coffee", image=image)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[10:50, 10:50] = True
    jobs_before, warmups_before = template.jobs.count(), template.warmups.count()
    with pytest.raises(ValueError, match="guidance"):
        services.submit_job(
            owner=demo_user, template=template, mask=mask, prompt="x", seed=0, steps=4, guidance=float("inf")
        )
    with pytest.raises(ValueError, match="guidance"):
        warmups.request_warmup(template, seed=0, steps=4, guidance=float("nan"))
    assert template.jobs.count() == jobs_before
    assert template.warmups.count() == warmups_before


@pytest.mark.django_db
def test_edit_waits_through_broker_loss(demo_user, media_root, monkeypatch):
    """A broker that goes away mid-job is reported once; the command still waits for the job's row."""
    from types import SimpleNamespace

    from redis.exceptions import ConnectionError as RedisConnectionError

    from editing import jobstate
    from editing.management.commands import edit
    from editing.models import JobStatus
    from tests.conftest import job_row, template_row

    job = job_row(template_row(demo_user))
    assert jobstate.claim(job.pk, worker="w1")

    checks = []

    def broker_gone(timeout_s: float = 2.0) -> set[str]:
        checks.append(timeout_s)
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    polls = []

    def sleep(_seconds: float) -> None:
        polls.append(1)
        if len(polls) == 5:
            assert jobstate.succeed(job.pk, result_name="results/r.png", timings={"denoise": 1.0})

    monkeypatch.setattr(edit, "live_queues", broker_gone)
    monkeypatch.setattr(edit, "WORKER_CHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(edit, "time", SimpleNamespace(monotonic=edit.time.monotonic, sleep=sleep))
    stdout, stderr = StringIO(), StringIO()

    final = edit.Command(stdout=stdout, stderr=stderr).wait(job)

    assert final.status == JobStatus.SUCCEEDED
    assert len(checks) == 1
    assert stderr.getvalue().count("Lost the Redis broker") == 1
    assert "Connection refused" in stderr.getvalue()
    assert "succeeded: 100.0%" in stdout.getvalue()


@pytest.mark.django_db
def test_edit_rejects_unwritable_out(demo_user, mask_file, tmp_path):
    from editing.models import EditJob

    with pytest.raises(CommandError, match="is a folder; give a file path"):
        call_command("edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="x", out=tmp_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    with pytest.raises(CommandError, match="cannot create the folder"):
        call_command("edit", image=PHOTOS / "coffee.png", mask=mask_file, prompt="x", out=blocked / "o.png")
    assert EditJob.objects.count() == 0
