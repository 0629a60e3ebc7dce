"""Warm-ups requested for every live worker: one per worker, each sent to that worker's own queue."""

from __future__ import annotations

import pytest
from django.contrib.admin.sites import site
from django.contrib.messages.storage.fallback import FallbackStorage
from django.test import RequestFactory

from editing import catalog, fleet, warmups
from editing.models import CacheWarmup, JobStatus, Template
from editor_site import redis_keys
from editor_site.celery import app as celery_app
from tests.conftest import PHOTOS
from tests.test_api_templates import upload
from tests.test_i18n import JAPANESE

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet_of(monkeypatch, settings):
    """Set the live workers that the web side reads; return the warm-up messages sent, as (queue, warm-up id)."""
    settings.EDITOR_WARMUP_ON_CREATE = False
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(celery_app.conf, "broker_url", "redis://127.0.0.1:6379/15")

    def send_task(name, args=None, queue=None, **_kwargs):
        assert name == warmups.RUN_WARMUP_TASK
        sent.append((queue, args[0]))

    monkeypatch.setattr(celery_app, "send_task", send_task)

    def set_workers(*workers: fleet.WorkerState | None) -> list[tuple[str, int]]:
        value = None if workers == (None,) else list(workers)
        monkeypatch.setattr(fleet, "live_workers", lambda: value)
        return sent

    return set_workers


def model_name() -> str:
    return catalog.default_model().name


def uploaded_template(client) -> dict:
    response = upload(client, (PHOTOS / "coffee.png").read_bytes(), file_name="coffee.png")
    assert response.status_code == 201, response.content
    return response.json()


def test_warm_all_queues_one_per_serving_worker(
    api_client_for, media_root, fleet_of, django_capture_on_commit_callbacks
):
    sent = fleet_of(
        fleet.WorkerState("b@host", (model_name(),), ()),
        fleet.WorkerState("a@host", (model_name(),), ()),
        fleet.WorkerState("other@host", ("some-other-model",), ()),
    )
    client = api_client_for("alice")
    template = uploaded_template(client)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/templates/{template['id']}/warm-all/", {"steps": 3, "seed": 7}, format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert [row["target_worker"] for row in body] == ["a@host", "b@host"]
    assert all((row["steps"], row["seed"], row["status"]) == (3, 7, "queued") for row in body)
    assert sorted(sent) == sorted((redis_keys.direct_queue(row["target_worker"]), row["id"]) for row in body)

    # Asking again while they are queued returns the same warm-ups and sends nothing new.
    with django_capture_on_commit_callbacks(execute=True):
        again = client.post(f"/api/templates/{template['id']}/warm-all/", {"steps": 3, "seed": 7}, format="json")
    assert sorted(row["id"] for row in again.json()) == sorted(row["id"] for row in body)
    assert len(sent) == 2


@pytest.mark.parametrize("workers", [(), (fleet.WorkerState("a@host", ("some-other-model",), ()),)],
                         ids=["no-live-worker", "other-model-only"])
def test_warm_all_without_workers_is_409(api_client_for, media_root, fleet_of, workers):
    fleet_of(*workers)
    client = api_client_for("alice")
    template = uploaded_template(client)
    response = client.post(f"/api/templates/{template['id']}/warm-all/", {}, format="json", HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert model_name() in detail
    assert f"/api/templates/{template['id']}/warm/" in detail
    assert not CacheWarmup.objects.exists()

    japanese = client.post(f"/api/templates/{template['id']}/warm-all/", {}, format="json", HTTP_ACCEPT_LANGUAGE="ja")
    assert japanese.status_code == 409
    assert JAPANESE.search(japanese.json()["detail"])


def test_warm_all_redis_down_503(api_client_for, media_root, fleet_of):
    fleet_of(None)
    client = api_client_for("alice")
    template = uploaded_template(client)
    response = client.post(f"/api/templates/{template['id']}/warm-all/", {}, format="json", HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "Redis" in response.json()["detail"]
    assert not CacheWarmup.objects.exists()

    japanese = client.post(f"/api/templates/{template['id']}/warm-all/", {}, format="json", HTTP_ACCEPT_LANGUAGE="ja")
    assert japanese.status_code == 503
    assert JAPANESE.search(japanese.json()["detail"])


def test_warm_all_rejects_bad_parameters_by_field(api_client_for, media_root, fleet_of):
    fleet_of(fleet.WorkerState("a@host", (model_name(),), ()))
    client = api_client_for("alice")
    template = uploaded_template(client)
    response = client.post(f"/api/templates/{template['id']}/warm-all/", {"steps": 0}, format="json")
    assert response.status_code == 400
    assert "steps" in response.json()
    assert not CacheWarmup.objects.exists()


def test_requested_worker_gone_falls_back_to_control_queue(make_user, media_root, fleet_of):
    fleet_of(fleet.WorkerState("a@host", (model_name(),), ()))
    owner = make_user()
    template = Template.objects.create(owner=owner, name="t", width=8, height=8, content_hash="0" * 64)
    warmup = CacheWarmup.objects.create(
        template=template, seed=0, steps=2, guidance=30.0, variant="kv", model=model_name(), target_worker="a@host"
    )
    sent = fleet_of(fleet.WorkerState("b@host", (model_name(),), ()))
    warmups.enqueue_warmup(warmup)
    assert sent == [(warmups.control_queue(model_name()), warmup.pk)]

    sent = fleet_of(fleet.WorkerState("a@host", (model_name(),), ()))
    warmups.enqueue_warmup(warmup, countdown=5)
    assert sent[-1] == (redis_keys.direct_queue("a@host"), warmup.pk)


def test_admin_action_warms_every_worker(admin_user, media_root, fleet_of, django_capture_on_commit_callbacks):
    sent = fleet_of(
        fleet.WorkerState("a@host", (model_name(),), ()), fleet.WorkerState("b@host", (model_name(),), ())
    )
    template = Template.objects.create(owner=admin_user, name="t", width=8, height=8, content_hash="1" * 64)
    request = RequestFactory().post("/admin/editing/template/")
    request.user = admin_user
    request.session = {}
    request._messages = FallbackStorage(request)
    model_admin = site._registry[Template]
    with django_capture_on_commit_callbacks(execute=True):
        model_admin.warm_cache_everywhere(request, Template.objects.filter(pk=template.pk))
    rows = CacheWarmup.objects.filter(template=template, status=JobStatus.QUEUED)
    assert sorted(rows.values_list("target_worker", flat=True)) == ["a@host", "b@host"]
    assert len(sent) == 2
    assert "2" in str(list(request._messages)[0])

    fleet_of()
    model_admin.warm_cache_everywhere(request, Template.objects.filter(pk=template.pk))
    error = list(request._messages)[-1]
    assert model_name() in str(error)
    assert rows.count() == 2

    fleet_of(None)
    model_admin.warm_cache_everywhere(request, Template.objects.filter(pk=template.pk))
    assert "Redis" in str(list(request._messages)[-1])
    assert rows.count() == 2


def test_warmup_list_follows_each_warmup(api_client_for, media_root, fleet_of, django_capture_on_commit_callbacks):
    fleet_of(fleet.WorkerState("a@host", (model_name(),), ()), fleet.WorkerState("b@host", (model_name(),), ()))
    client = api_client_for("alice")
    template = uploaded_template(client)
    with django_capture_on_commit_callbacks(execute=True):
        queued = client.post(f"/api/templates/{template['id']}/warm-all/", {}, format="json").json()
    CacheWarmup.objects.filter(pk=queued[0]["id"]).update(status=JobStatus.SUCCEEDED, worker="a@host")

    listed = client.get(f"/api/templates/{template['id']}/warmups/").json()
    by_id = {row["id"]: row for row in listed}
    assert set(by_id) == {row["id"] for row in queued}
    assert by_id[queued[0]["id"]]["status"] == "succeeded"
    assert by_id[queued[1]["id"]]["status"] == "queued"

    # Another user's template is not found, as for every template route.
    assert api_client_for("bob").get(f"/api/templates/{template['id']}/warmups/").status_code == 404
