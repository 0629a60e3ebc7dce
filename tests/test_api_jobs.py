"""Edit-job submission, validation, status, cancel and isolation through the API (no worker)."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from editing.models import EditJob, JobStatus
from tests.conftest import PHOTOS, png_bytes, stroke_mask
from tests.test_i18n import JAPANESE

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(api_client_for):
    return api_client_for("alice")


@pytest.fixture
def coffee(alice, media_root) -> dict:
    response = alice.post(
        "/api/templates/",
        {"image": SimpleUploadedFile("coffee.png", (PHOTOS / "coffee.png").read_bytes())},
        format="multipart",
    )
    assert response.status_code == 201
    return response.json()


def submit(client, template_id, mask: np.ndarray | bytes, **fields):
    data = mask if isinstance(mask, bytes) else png_bytes(mask)
    payload = {"template": template_id, "mask": SimpleUploadedFile("mask.png", data), "prompt": "a red cup"}
    payload.update(fields)
    return client.post("/api/jobs/", payload, format="multipart")


def test_submit_job_is_queued_with_bucket(alice, coffee, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = submit(alice, coffee["id"], stroke_mask(600, 400))
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued"
    assert body["queue_position"] == 0
    assert 0 < body["mask_ratio"] < 0.25
    assert body["model"] == "flux"
    assert body["queue"] == f"edit.flux.{body['bucket']}"
    assert body["steps"] == 20
    assert body["seed"] == 0
    assert len(callbacks) == 1


def test_bucket_follows_mask_ratio(alice, coffee):
    full = np.full((400, 600), 255, dtype=np.uint8)
    body = submit(alice, coffee["id"], full).json()
    assert body["mask_ratio"] == 1.0
    assert body["queue"] == "edit.flux.m100"


def test_queue_position_counts_jobs_ahead(alice, coffee):
    first = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    second = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    assert first["queue_position"] == 0
    assert second["queue_position"] == 1


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"steps": "-3"}, "steps", "-3"),
        ({"steps": "abc"}, "steps", "abc"),
        ({"steps": "1000"}, "steps", "1000"),
        ({"seed": str(2**40)}, "seed", str(2**40)),
        ({"seed": "-1"}, "seed", "-1"),
        ({"guidance": "nan"}, "guidance", "nan"),
        ({"guidance": "1e9"}, "guidance", "got 1e9."),
        ({"guidance": "-1"}, "guidance", "got -1."),
        ({"prompt": "   "}, "prompt", "prompt"),
        ({"prompt": "x" * 5000}, "prompt", "5000"),
        ({"template": "999999"}, "template", "999999"),
        ({"template": "../etc"}, "template", "../etc"),
    ],
)
def test_invalid_parameters_get_400_naming_field_and_value(alice, coffee, fields, field, fragment):
    response = submit(alice, coffee["id"], stroke_mask(600, 400), **fields)
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body
    assert fragment in body[field][0]
    assert EditJob.objects.count() == 0


def test_wrong_size_mask_names_both_sizes(alice, coffee):
    response = submit(alice, coffee["id"], stroke_mask(300, 200))
    assert response.status_code == 400
    message = response.json()["mask"][0]
    assert "300" in message
    assert "600" in message


def test_empty_mask_is_rejected(alice, coffee):
    response = submit(alice, coffee["id"], np.zeros((400, 600), dtype=np.uint8))
    assert response.status_code == 400
    assert "mask" in response.json()


def test_non_image_mask_is_rejected(alice, coffee):
    response = submit(alice, coffee["id"], b"GIF89a but not really")
    assert response.status_code == 400
    assert "mask" in response.json()


def test_missing_mask_is_rejected(alice, coffee):
    response = alice.post("/api/jobs/", {"template": coffee["id"], "prompt": "x"}, format="multipart")
    assert response.status_code == 400
    assert "mask" in response.json()


def test_cancel_queued_job(alice, coffee):
    job = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    response = alice.post(f"/api/jobs/{job['id']}/cancel/")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = alice.post(f"/api/jobs/{job['id']}/cancel/")
    assert again.status_code == 409


def test_cancel_running_job_sets_flag(alice, coffee):
    job = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    EditJob.objects.filter(pk=job["id"]).update(status=JobStatus.RUNNING)
    body = alice.post(f"/api/jobs/{job['id']}/cancel/").json()
    assert body["status"] == "running"
    assert body["cancel_requested"] is True


def test_result_before_success_is_404(alice, coffee):
    job = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    assert job["result_url"] is None
    assert alice.get(f"/api/jobs/{job['id']}/result/").status_code == 404


def test_other_user_cannot_see_cancel_or_use(api_client_for, alice, coffee):
    job = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    bob = api_client_for("bob")
    assert bob.get("/api/jobs/").json()["results"] == []
    assert bob.get(f"/api/jobs/{job['id']}/").status_code == 404
    assert bob.get(f"/api/jobs/{job['id']}/result/").status_code == 404
    assert bob.post(f"/api/jobs/{job['id']}/cancel/").status_code == 404
    response = submit(bob, coffee["id"], stroke_mask(600, 400))
    assert response.status_code == 400
    assert "template" in response.json()


def test_malformed_job_id_is_404(alice):
    assert alice.get("/api/jobs/not-a-uuid/").status_code == 404


def test_delete_template_with_queued_job_conflicts(alice, coffee):
    submit(alice, coffee["id"], stroke_mask(600, 400))
    assert alice.delete(f"/api/templates/{coffee['id']}/").status_code == 409



def test_not_found_names_the_id_and_the_fix(api_client_for, coffee):
    bob = api_client_for("bob")
    english = bob.get(f"/api/templates/{coffee['id']}/")
    japanese = bob.get("/api/jobs/00000000-0000-0000-0000-000000000000/", HTTP_ACCEPT_LANGUAGE="ja")
    malformed = bob.get("/api/jobs/abc/")

    assert english.status_code == 404
    assert japanese.status_code == 404
    assert malformed.status_code == 404
    assert english.json()["detail"] == (
        f"Template {coffee['id']} was not found, or it belongs to another user. "
        "GET /api/templates/ lists your templates."
    )
    assert "00000000-0000-0000-0000-000000000000" in japanese.json()["detail"]
    assert "/api/jobs/" in japanese.json()["detail"]
    assert "見つかりません" in japanese.json()["detail"]
    assert malformed.json()["detail"].startswith("Job abc was not found")


def test_result_messages_follow_job_status(alice, coffee):
    job = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    queued = alice.get(f"/api/jobs/{job['id']}/result/").json()["detail"]
    EditJob.objects.filter(pk=job["id"]).update(status=JobStatus.FAILED)
    failed = alice.get(f"/api/jobs/{job['id']}/result/").json()["detail"]
    EditJob.objects.filter(pk=job["id"]).update(status=JobStatus.CANCELLED)
    cancelled = alice.get(f"/api/jobs/{job['id']}/result/").json()["detail"]

    assert queued == (
        f"Job {job['id']} has no result yet; its status is queued. Poll GET /api/jobs/{job['id']}/ until it is "
        "succeeded."
    )
    assert failed == (
        f"Job {job['id']} has no result because it ended with status failed; see its error, or submit the edit "
        "again."
    )
    assert cancelled == f"Job {job['id']} was cancelled, so it has no result; submit the edit again."


def test_missing_fields_name_the_field_and_the_fix(alice, coffee):
    as_json = alice.post("/api/jobs/", {"template": coffee["id"], "prompt": "a red cup"}, format="json").json()
    empty = alice.post("/api/jobs/", {}, format="multipart").json()
    japanese = alice.post("/api/jobs/", {}, format="multipart", HTTP_ACCEPT_LANGUAGE="ja").json()

    assert as_json["mask"] == [
        "mask is required: a mask image of the template's size, white where the edit goes; send it as a file in "
        "a multipart/form-data request."
    ]
    assert empty["template"] == [
        "template is required: the id of one of your templates (GET /api/templates/ lists them)."
    ]
    assert empty["prompt"] == ["prompt is required: describe what the masked region should show."]
    assert "multipart/form-data" in japanese["mask"][0]
    assert "必須" in japanese["template"][0]


def test_long_template_name_gives_its_length(alice, media_root):
    response = alice.post(
        "/api/templates/",
        {"image": SimpleUploadedFile("c.png", (PHOTOS / "coffee.png").read_bytes()), "name": "n" * 250},
        format="multipart",
    )
    assert response.status_code == 400
    assert response.json()["name"] == ["name has 250 characters, over the limit of 200; shorten it."]


def test_nul_in_prompt_names_the_position(alice, coffee):
    response = submit(alice, coffee["id"], stroke_mask(600, 400), prompt="a red\x00 cup")
    assert response.status_code == 400
    assert response.json()["prompt"] == ["prompt contains a NUL character (code 0) at character 6; remove it."]


def test_job_list_filters(alice, coffee):
    from editing import jobstate

    first = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    second = submit(alice, coffee["id"], stroke_mask(600, 400)).json()
    other = alice.post(
        "/api/templates/",
        {"image": SimpleUploadedFile("chelsea.png", (PHOTOS / "chelsea.png").read_bytes())},
        format="multipart",
    ).json()
    third = submit(alice, other["id"], stroke_mask(451, 300)).json()
    assert jobstate.cancel_queued(second["id"])

    def ids(query: str) -> set[str]:
        response = alice.get(f"/api/jobs/{query}")
        assert response.status_code == 200, response.content
        return {job["id"] for job in response.json()["results"]}

    assert ids("") == {first["id"], second["id"], third["id"]}
    assert ids("?status=cancelled") == {second["id"]}
    assert ids("?status=queued") == {first["id"], third["id"]}
    assert ids(f"?template={other['id']}") == {third["id"]}
    assert ids(f"?status=queued&template={coffee['id']}") == {first["id"]}


def test_job_list_rejects_bad_filters(alice):
    bad_status = alice.get("/api/jobs/?status=done")
    bad_template = alice.get("/api/jobs/?template=abc")
    japanese = alice.get("/api/jobs/?status=done", HTTP_ACCEPT_LANGUAGE="ja")

    assert bad_status.status_code == 400
    assert bad_status.json()["status"] == [
        "'done' is not a job status; use one of queued, running, succeeded, failed, cancelled."
    ]
    assert bad_template.status_code == 400
    assert bad_template.json()["template"] == [
        "'abc' is not a template id; use the number from GET /api/templates/."
    ]
    assert japanese.status_code == 400
    assert "'done'" in japanese.json()["status"][0]
    assert JAPANESE.search(japanese.json()["status"][0])
