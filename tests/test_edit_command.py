"""The `manage.py edit` command: submit through the queue, wait, write the result."""

from __future__ import annotations

from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from editing import imaging
from tests.conftest import PHOTOS, png_bytes, stroke_mask


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
    with pytest.raises(CommandError, match="mask"):
        call_command("edit", image=PHOTOS / "coffee.png", mask=small, prompt="x", out=tmp_path / "o.png")


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
