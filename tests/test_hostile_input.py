"""Hostile and malformed input at the API edge: every rejection is a 4xx naming the field, never a 500,
and a rejected request writes no row and no file."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from rest_framework.test import APIClient

from editing.models import EditJob, Template
from tests.conftest import png_bytes

pytestmark = pytest.mark.django_db

SIZE = 64


@pytest.fixture
def media(settings, tmp_path: Path) -> Path:
    """A media folder of this test alone, so that any file a request writes shows up."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.EDITOR_WARMUP_ON_CREATE = False
    settings.EDITOR_JOB_SUBMIT_RATE = None
    return settings.MEDIA_ROOT


def stored_files(media: Path) -> list[Path]:
    return sorted(path for path in media.rglob("*") if path.is_file()) if media.exists() else []


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels but contains one row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def image_png(width: int = SIZE, height: int = SIZE) -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def zip_payload() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil.sh", "rm -rf /\n")
    return buffer.getvalue()


def gif_with_script() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (SIZE, SIZE), 3).save(buffer, format="GIF", comment=b"<script>alert(1)</script>")
    return buffer.getvalue()


@pytest.fixture
def alice(api_client_for) -> APIClient:
    return api_client_for("alice")


@pytest.fixture
def template_id(alice, media) -> int:
    response = alice.post("/api/templates/", {"image": SimpleUploadedFile("t.png", image_png())}, format="multipart")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def full_mask(width: int = SIZE, height: int = SIZE) -> bytes:
    return png_bytes(np.full((height, width), 255, dtype=np.uint8))


TEMPLATE_CASES = [
    ("zero-byte", b"", "empty"),
    ("truncated", image_png()[:200], "image"),
    ("not an image", b"#!/bin/sh\necho hello\n", "image"),
    ("html", b"<html><script>alert(1)</script></html>", "image"),
    ("strip 1x100000", png_bytes(np.zeros((100000, 1, 3), dtype=np.uint8)), "100000"),
    ("bomb header", png_claiming_size(100000, 100000), "16777216 pixels"),
    ("bomb just over limit", png_claiming_size(4097, 4096), "4097"),
    ("one pixel", png_bytes(np.zeros((1, 1, 3), dtype=np.uint8)), "1×1 pixels; its shorter side must be at least 64"),
    ("tiny", png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)), "at least 64 pixels"),
    ("banner too thin", png_bytes(np.zeros((63, 600, 3), dtype=np.uint8)), "600×63"),
]


@pytest.mark.parametrize(("case", "data", "fragment"), TEMPLATE_CASES, ids=[case[0] for case in TEMPLATE_CASES])
def test_bad_template_rejected_writes_nothing(alice, media, case, data, fragment):
    response = alice.post("/api/templates/", {"image": SimpleUploadedFile("t.png", data)}, format="multipart")

    assert response.status_code == 400, response.content
    body = response.json()
    assert list(body) == ["image"]
    assert fragment in body["image"][0]
    assert Template.objects.count() == 0
    assert stored_files(media) == []


def test_oversized_template_rejected_before_decoding(alice, media, settings):
    settings.EDITOR_MAX_UPLOAD_BYTES = 4096
    data = image_png(256, 256)
    assert len(data) > 4096

    response = alice.post("/api/templates/", {"image": SimpleUploadedFile("t.png", data)}, format="multipart")

    assert response.status_code == 400
    assert str(len(data)) in response.json()["image"][0]
    assert stored_files(media) == []


@pytest.mark.parametrize(
    ("case", "data", "payload"),
    [("png+zip", image_png() + zip_payload(), b"PK\x03\x04"), ("gif+script", gif_with_script(), b"<script")],
)
def test_polyglot_template_is_stored_reencoded(alice, media, case, data, payload):
    response = alice.post("/api/templates/", {"image": SimpleUploadedFile("t.gif", data)}, format="multipart")

    # The pixels are valid, so the upload is accepted. What is stored and served is a fresh PNG of
    # those pixels, without the appended archive or the comment.
    assert response.status_code == 201, response.content
    (stored,) = stored_files(media)
    assert payload not in stored.read_bytes()
    served = alice.get(response.json()["image_url"])
    assert served["Content-Type"] == "image/png"
    assert served["X-Content-Type-Options"] == "nosniff"
    assert payload not in b"".join(served.streaming_content)


def test_path_like_file_name_is_only_display_text(alice, media, tmp_path):
    response = alice.post(
        "/api/templates/", {"image": SimpleUploadedFile("../../etc/passwd.png", image_png())}, format="multipart"
    )

    assert response.status_code == 201, response.content
    assert response.json()["name"] == "passwd"
    (stored,) = stored_files(media)
    assert stored.parent == media / "templates"
    assert "passwd" not in stored.name
    assert not (tmp_path / "etc").exists()


def job_payload(template_id: int, **fields) -> dict:
    payload = {"template": template_id, "mask": SimpleUploadedFile("m.png", full_mask()), "prompt": "a red cup"}
    payload.update(fields)
    return payload


JOB_CASES = [
    ("zero-byte mask", {"mask": b""}, "mask"),
    ("truncated mask", {"mask": full_mask()[:60]}, "mask"),
    ("non-image mask", {"mask": b"%PDF-1.7"}, "mask"),
    ("wrong-size mask", {"mask": full_mask(SIZE * 2, SIZE)}, "mask"),
    ("empty mask", {"mask": png_bytes(np.zeros((SIZE, SIZE), dtype=np.uint8))}, "mask"),
    ("bomb mask", {"mask": png_claiming_size(100000, 100000)}, "mask"),
    ("huge prompt", {"prompt": "x" * 100_000}, "prompt"),
    ("NUL in prompt", {"prompt": "a\x00b"}, "prompt"),
    ("negative steps", {"steps": "-1"}, "steps"),
    ("zero steps", {"steps": "0"}, "steps"),
    ("float steps", {"steps": "2.5"}, "steps"),
    ("seed over range", {"seed": str(2**32)}, "seed"),
    ("seed of 5000 digits", {"seed": "9" * 5000}, "seed"),
    ("negative seed", {"seed": "-5"}, "seed"),
    ("infinite guidance", {"guidance": "inf"}, "guidance"),
    ("path-like template id", {"template": "../../etc/passwd"}, "template"),
    ("SQL-like template id", {"template": "1 OR 1=1"}, "template"),
]


@pytest.mark.parametrize(("case", "fields", "field"), JOB_CASES, ids=[case[0] for case in JOB_CASES])
def test_bad_job_rejected_writes_nothing(alice, template_id, media, case, fields, field):
    before = stored_files(media)
    if "mask" in fields:
        fields = {**fields, "mask": SimpleUploadedFile("m.png", fields["mask"])}

    response = alice.post("/api/jobs/", job_payload(template_id, **fields), format="multipart")

    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body
    assert body[field][0]
    assert EditJob.objects.count() == 0
    assert stored_files(media) == before


def test_json_body_with_wrong_types_is_400(alice, template_id, media):
    response = alice.post(
        "/api/jobs/", {"template": {"id": template_id}, "mask": [1, 2], "prompt": ["a"], "steps": {}}, format="json"
    )

    assert response.status_code == 400, response.content
    assert {"template", "mask", "prompt", "steps"} <= set(response.json())
    assert EditJob.objects.count() == 0


def test_other_users_objects_are_hidden(api_client_for, alice, template_id, media):
    job = alice.post("/api/jobs/", job_payload(template_id), format="multipart").json()
    bob = api_client_for("bob")

    assert bob.get(f"/api/templates/{template_id}/").status_code == 404
    assert bob.get(f"/api/templates/{template_id}/image/").status_code == 404
    assert bob.post(f"/api/templates/{template_id}/warm/", {}, format="json").status_code == 404
    assert bob.delete(f"/api/templates/{template_id}/").status_code == 404
    assert bob.get(f"/api/jobs/{job['id']}/").status_code == 404
    assert bob.post(f"/api/jobs/{job['id']}/cancel/").status_code == 404
    assert bob.get(f"/api/jobs/{job['id']}/result/").status_code == 404
    assert bob.get("/api/templates/").json()["results"] == []
    stolen = bob.post("/api/jobs/", job_payload(template_id), format="multipart")
    assert stolen.status_code == 400
    assert "template" in stolen.json()
    assert EditJob.objects.count() == 1
    assert Template.objects.get(pk=template_id).owner.username == "alice"


def test_session_write_without_csrf_token_is_403(make_user, media):
    make_user("carol")
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="carol", password="pw-carol")

    response = client.post("/api/templates/", {"image": SimpleUploadedFile("t.png", image_png())}, format="multipart")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert Template.objects.count() == 0
    assert stored_files(media) == []


def test_session_write_with_csrf_token_succeeds(make_user, media):
    make_user("carol")
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="carol", password="pw-carol")
    token = client.get("/accounts/login/").cookies["csrftoken"].value

    response = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("t.png", image_png())}, format="multipart",
        HTTP_X_CSRFTOKEN=token,
    )

    assert response.status_code == 201, response.content


def test_job_submission_is_throttled_per_user(api_client_for, alice, template_id, media, settings):
    settings.EDITOR_JOB_SUBMIT_RATE = "2/min"
    cache.clear()

    statuses = [alice.post("/api/jobs/", job_payload(template_id), format="multipart").status_code for _ in range(3)]
    limited = alice.post("/api/jobs/", job_payload(template_id), format="multipart")
    other_user = api_client_for("bob").get("/api/jobs/")

    assert statuses == [201, 201, 429]
    assert limited.status_code == 429
    assert "2/min" in limited.json()["detail"]
    assert int(limited["Retry-After"]) >= 1
    assert alice.get("/api/jobs/").status_code == 200
    assert other_user.status_code == 200
    assert EditJob.objects.count() == 2
