"""Served models: the catalog, the models API, per-model queues and rejection of unserved models."""

from __future__ import annotations

import json
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from editing import catalog, fleet
from editing.catalog import parse_models
from editing.models import CacheWarmup, EditJob
from editor_site import redis_keys
from tests.conftest import PHOTOS, png_bytes, stroke_mask

pytestmark = pytest.mark.django_db

TWO_MODELS = "fill=flux:demo,inpaint=sd2:demo"


@pytest.fixture
def two_models(settings):
    settings.EDITOR_MODELS = parse_models(TWO_MODELS)
    settings.EDITOR_WORKER_MODELS = ["fill", "inpaint"]
    return settings


@pytest.fixture
def heartbeats(redis_url):
    """Write worker heartbeat records the way workers/heartbeat.py does; remove them afterwards."""
    client = redis_keys.client()
    written: list[str] = []

    def write(hostname: str, models: list[str]) -> None:
        key = redis_keys.worker_state_key(hostname)
        client.set(key, json.dumps({"hostname": hostname, "models": models, "queues": [], "at": time.time()}), ex=30)
        written.append(key)

    for key in client.scan_iter(match=redis_keys.worker_state_pattern()):
        client.delete(key)
    yield write
    for key in written:
        client.delete(key)


@pytest.fixture
def alice(api_client_for):
    return api_client_for("alice")


def upload(client, **fields):
    payload = {"image": SimpleUploadedFile("coffee.png", (PHOTOS / "coffee.png").read_bytes()), **fields}
    return client.post("/api/templates/", payload, format="multipart")


def submit(client, template_id: int, headers: dict | None = None, **fields):
    payload = {
        "template": template_id, "mask": SimpleUploadedFile("mask.png", png_bytes(stroke_mask(600, 400))),
        "prompt": "a red cup", **fields,
    }
    return client.post("/api/jobs/", payload, format="multipart", headers=headers)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("flux", "must look like name=family:ref"),
        ("a=flux:demo,a=sd2:demo", "twice"),
        ("x=unet:demo", "use one of"),
        ("Big Name=flux:demo", "lowercase"),
        ("", "lists no model"),
        ("x=sd3:", "must look like"),
    ],
)
def test_parse_models_rejects_bad_entries(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_models(raw)


def test_parse_models_keeps_order_and_default(two_models):
    assert catalog.names() == ["fill", "inpaint"]
    assert catalog.default_model().family == "flux"
    assert catalog.get("inpaint").facts.pixels_per_token == 8
    assert catalog.get("missing") is None


def test_native_resolution_reads_a_local_checkpoint(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32, 32]}))
    spec = catalog.ModelSpec(name="local", family="sd2", ref=str(tmp_path))
    assert catalog.native_resolution(spec) == 768
    assert catalog.native_resolution(catalog.ModelSpec("d", "sd2", "demo")) == 512


def test_models_api_lists_family_and_resolution(alice, two_models):
    response = alice.get("/api/models/")
    assert response.status_code == 200
    rows = {row["name"]: row for row in response.json()}
    assert set(rows) == {"fill", "inpaint"}
    assert rows["fill"]["family"] == "flux"
    assert rows["fill"]["default"] is True
    assert rows["inpaint"]["native_resolution"] == 512
    assert rows["inpaint"]["default"] is False
    assert rows["inpaint"]["pixels_per_token"] == 8


def test_models_api_needs_login(client):
    assert client.get("/api/models/").status_code in (401, 403)


def test_unknown_model_job_rejected(alice, two_models, media_root):
    template = upload(alice).json()
    response = submit(alice, template["id"], model="sdxl-big")
    assert response.status_code == 400
    message = response.json()["model"][0]
    assert "sdxl-big" in message
    assert "fill, inpaint" in message
    assert EditJob.objects.count() == 0


def test_unknown_model_job_rejected_japanese(alice, two_models, media_root):
    template = upload(alice).json()
    response = submit(alice, template["id"], model="nope", headers={"Accept-Language": "ja"})
    assert response.status_code == 400
    message = response.json()["model"][0]
    assert "nope" in message
    assert "モデル" in message


def test_unserved_model_job_rejected(alice, two_models, heartbeats, media_root):
    template = upload(alice).json()
    heartbeats("worker-a@host", ["fill"])
    response = submit(alice, template["id"], model="inpaint")
    assert response.status_code == 400
    assert "inpaint" in response.json()["model"][0]
    assert EditJob.objects.count() == 0

    heartbeats("worker-b@host", ["inpaint"])
    assert submit(alice, template["id"], model="inpaint").status_code == 201


def test_job_routes_to_its_models_queue(alice, two_models, heartbeats, media_root):
    template = upload(alice).json()
    body = submit(alice, template["id"], model="inpaint").json()
    assert body["model"] == "inpaint"
    assert body["queue"] == f"edit.inpaint.{body['bucket']}"
    default = submit(alice, template["id"]).json()
    assert default["model"] == "fill"
    assert default["queue"].startswith("edit.fill.")


def test_template_model_default_for_jobs(alice, two_models, heartbeats, media_root, settings):
    settings.EDITOR_CACHE_VARIANT = "hidden"
    template = upload(alice, model="inpaint").json()
    assert template["model"] == "inpaint"
    warmup = CacheWarmup.objects.get(template_id=template["id"])
    # The UNet family caches keys and values only, whatever the deployment's variant setting.
    assert (warmup.model, warmup.variant) == ("inpaint", "kv")
    job = submit(alice, template["id"]).json()
    assert job["model"] == "inpaint"
    # The mask ratio is counted in the model's own 8-pixel tokens.
    assert job["queue"].startswith("edit.inpaint.")


def test_template_upload_with_unknown_model_is_rejected(alice, two_models, media_root):
    response = upload(alice, model="nope")
    assert response.status_code == 400
    assert "nope" in response.json()["model"][0]


def test_running_worker_publishes_its_models(celery_worker_process):
    deadline = time.monotonic() + 15
    workers = []
    while time.monotonic() < deadline:
        workers = fleet.live_workers() or []
        if workers:
            break
        time.sleep(0.5)
    assert any("flux" in worker.models for worker in workers)
    assert any(any(queue.startswith("edit.flux.") for queue in worker.queues) for worker in workers)


def test_editor_model_choice_several_models(make_user, settings):
    from django.test import Client

    client = Client()
    client.force_login(make_user("carol"))
    single = client.get("/").content.decode()
    assert 'id="model"' not in single
    settings.EDITOR_MODELS = parse_models(TWO_MODELS)
    page = client.get("/", headers={"Accept-Language": "ja"}).content.decode()
    assert 'id="model"' in page
    assert 'value="inpaint"' in page
    assert "Stable Diffusion 2" in page
    assert "テンプレートのモデル" in page


def test_warm_up_unknown_model_rejected(alice, two_models, media_root):
    template = upload(alice).json()
    response = alice.post(f"/api/templates/{template['id']}/warm/", {"model": "nope"}, format="json")
    assert response.status_code == 400
    assert "nope" in response.json()["model"][0]
    assert CacheWarmup.objects.filter(template_id=template["id"], model="nope").count() == 0
