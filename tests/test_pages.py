"""Editor, history, job mask, login and API docs pages rendered by Django."""

from __future__ import annotations

import io
import json
import re
import uuid

import numpy as np
import pytest
from django.test import Client
from PIL import Image

from editing import pages, services
from editing.models import CacheOutcome, EditJob, JobStatus
from tests.conftest import stroke_mask

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def alice_client(alice) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def coffee_job(alice, media_root, settings) -> EditJob:
    settings.EDITOR_WARMUP_ON_CREATE = False
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :, 1] = 200
    template = services.create_template(owner=alice, name="coffee", image=image)
    return services.submit_job(
        owner=alice,
        template=template,
        mask=stroke_mask(60, 40) > 127,
        prompt="a blue ceramic cup",
        seed=7,
        steps=4,
        guidance=12.5,
    )


def script_json(html: str, element_id: str) -> dict:
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no JSON script #{element_id} in the page"
    return json.loads(match.group(1))


@pytest.mark.parametrize("path", ["/", "/history/", f"/jobs/{uuid.uuid4()}/mask.png"])
def test_anonymous_user_redirected_to_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_login_page_has_labelled_fields(client):
    response = client.get("/accounts/login/")
    html = response.content.decode()
    assert response.status_code == 200
    assert '<label for="id_username">' in html
    assert '<label for="id_password">' in html


def test_login_then_editor(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200


def test_editor_renders_config_and_scripts(alice_client, settings):
    response = alice_client.get("/")
    html = response.content.decode()
    config = script_json(html, "editor-config")
    messages = script_json(html, "editor-messages")

    assert response.status_code == 200
    assert config["templates_url"] == "/api/templates/"
    assert config["jobs_url"] == "/api/jobs/"
    assert config["max_steps"] == settings.EDITOR_MAX_STEPS
    assert config["prefill"] is None
    assert messages["status_running"] == "running"
    assert "/static/editing/js/editor.js" in html
    assert 'name="csrf-token"' in html


def test_editor_controls_have_labels(alice_client):
    html = alice_client.get("/").content.decode()
    for control_id in ["upload-image", "upload-name", "brush-size", "prompt", "seed", "steps", "guidance", "compare-slider"]:
        assert f'<label for="{control_id}"' in html, control_id


def test_editor_prefills_own_job(alice_client, coffee_job):
    html = alice_client.get(f"/?job={coffee_job.pk}").content.decode()
    prefill = script_json(html, "editor-config")["prefill"]

    assert prefill["template_id"] == coffee_job.template_id
    assert prefill["prompt"] == "a blue ceramic cup"
    assert prefill["seed"] == 7
    assert prefill["steps"] == 4
    assert prefill["guidance"] == 12.5
    assert prefill["mask_url"] == f"/jobs/{coffee_job.pk}/mask.png"
    assert ">a blue ceramic cup</textarea>" in html
    # The notice sits above the panels, so it shows without scrolling.
    assert html.index('id="prefill-loaded"') < html.index('id="template-panel"')
    assert f"Loaded job {coffee_job.pk} from the history: its template, mask, prompt and settings." in html
    assert script_json(html, "editor-config")["job_mask_url"] == "/jobs/{id}/mask.png"


@pytest.mark.parametrize("job_param", ["not-a-uuid", str(uuid.uuid4())])
def test_editor_ignores_unknown_job(alice_client, job_param):
    response = alice_client.get(f"/?job={job_param}")
    html = response.content.decode()
    assert response.status_code == 200
    assert script_json(html, "editor-config")["prefill"] is None
    assert f"Job {job_param} was not found among your jobs, so the editor starts empty." in html


def test_editor_without_job_shows_no_notice(alice_client):
    html = alice_client.get("/").content.decode()
    assert 'id="prefill-missing"' not in html
    assert 'id="prefill-loaded"' not in html


def test_editor_ignores_other_users_job(make_user, coffee_job):
    client = Client()
    client.force_login(make_user("bob"))
    html = client.get(f"/?job={coffee_job.pk}").content.decode()
    assert script_json(html, "editor-config")["prefill"] is None


def test_job_mask_returns_stored_mask(alice_client, coffee_job):
    response = alice_client.get(f"/jobs/{coffee_job.pk}/mask.png")
    mask = np.asarray(Image.open(io.BytesIO(b"".join(response.streaming_content))))

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert mask.shape == (40, 60)
    assert np.array_equal(mask > 127, stroke_mask(60, 40) > 127)


def test_job_mask_hidden_from_other_users(make_user, coffee_job):
    client = Client()
    client.force_login(make_user("bob"))
    assert client.get(f"/jobs/{coffee_job.pk}/mask.png").status_code == 404


def test_history_lists_own_jobs_with_timings_and_cache(alice_client, coffee_job, make_user):
    EditJob.objects.filter(pk=coffee_job.pk).update(
        status=JobStatus.SUCCEEDED,
        timings={"denoise": 3456.0, "load": 120.0, "gpu_sync": 9.0},
        cache_outcome=CacheOutcome.HIT,
        cache_variant="v1",
        flop_fraction=0.125,
    )
    bob = make_user("bob")
    services.submit_job(
        owner=bob, template=services.create_template(owner=bob, name="bob-only", image=np.zeros((16, 16, 3), np.uint8)),
        mask=np.ones((16, 16), dtype=bool), prompt="bob's secret prompt", seed=0, steps=1, guidance=1.0,
    )

    html = alice_client.get("/history/").content.decode()

    assert "a blue ceramic cup" in html
    assert "bob&#x27;s secret prompt" not in html
    assert "bob's secret prompt" not in html
    assert "load: 120 ms" in html
    assert "denoise: 3.5 s" in html
    assert str(CacheOutcome.HIT.label) in html
    assert "12.5% of a full run" in html
    assert f'href="/?job={coffee_job.pk}"' in html
    assert html.index("load: 120 ms") < html.index("denoise: 3.5 s") < html.index("gpu_sync: 9 ms")


def test_history_hides_internal_queue_name(alice_client, coffee_job):
    html = alice_client.get("/history/").content.decode()

    assert coffee_job.bucket
    assert f"<dd>{coffee_job.bucket}</dd>" not in html
    assert ">Queue<" not in html
    assert "share of latent tokens touched" in html


def test_editor_messages_for_session_and_lost_job(alice_client):
    html = alice_client.get("/").content.decode()
    messages = script_json(html, "editor-messages")

    assert 'data-login-url="/accounts/login/"' in html
    assert "Log in again" in messages["session_ended"]
    assert messages["log_in_again"]
    assert "no longer exists" in messages["job_lost"]
    assert messages["prompt_count"] == "%(count)s / %(max)s"
    assert "%(max)s" in messages["prompt_at_limit"]


def test_history_empty(alice_client):
    response = alice_client.get("/history/")
    assert response.status_code == 200
    assert "No edits yet." in response.content.decode()


def test_phase_timings_order_and_format():
    rows = pages.phase_timings({"store": 1000.0, "denoise": 999.6, "custom": "n/a", "load": 0})
    assert [row.phase for row in rows] == ["load", "denoise", "store"]
    assert [row.text for row in rows] == ["0 ms", "1.0 s", "1.0 s"]
    assert pages.total_text(rows) == "2.0 s"


def test_phase_timings_empty():
    assert pages.phase_timings(None) == []
    assert pages.phase_timings({}) == []


def test_api_docs_served_without_cdn(alice_client):
    response = alice_client.get("/api/docs/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in html
    assert not re.search(r'(src|href)="https?://', html)


def test_language_switch_sets_japanese(alice_client):
    response = alice_client.post("/i18n/setlang/", {"language": "ja", "next": "/history/"})
    assert response.status_code == 302
    assert response["Location"] == "/history/"
    html = alice_client.get("/history/").content.decode()
    assert '<html lang="ja">' in html


@pytest.fixture
def staff_client(django_user_model) -> Client:
    staff = django_user_model.objects.create_superuser(username="admin", password="pw-admin")
    client = Client()
    client.force_login(staff)
    return client


def test_admin_templates_list_shows_thumbnail_size_and_cache(staff_client, coffee_job):
    template = coffee_job.template
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert f'src="/admin/editing/template/{template.pk}/image/"' in html
    assert "60 × 40" in html
    assert '<td class="field-cache_state">not warmed up</td>' in html


def test_admin_template_image_served_to_staff(staff_client, coffee_job):
    response = staff_client.get(f"/admin/editing/template/{coffee_job.template_id}/image/")
    image = Image.open(io.BytesIO(b"".join(response.streaming_content)))
    assert response.status_code == 200
    assert image.size == (60, 40)


def test_admin_template_image_needs_staff(alice_client, coffee_job):
    response = alice_client.get(f"/admin/editing/template/{coffee_job.template_id}/image/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_admin_job_shows_phase_timings(staff_client, coffee_job):
    EditJob.objects.filter(pk=coffee_job.pk).update(timings={"load": 1500.0, "denoise": 250.0})
    listing = staff_client.get("/admin/editing/editjob/?status__exact=queued").content.decode()
    detail = staff_client.get(f"/admin/editing/editjob/{coffee_job.pk}/change/").content.decode()
    assert "load 1.5 s · total 1.8 s" in listing
    assert '<th scope="row">denoise</th><td>250 ms</td>' in detail
    assert f"/admin/editing/editjob/{coffee_job.pk}/mask.png" in detail


def test_admin_job_mask_served_to_staff(staff_client, coffee_job):
    response = staff_client.get(f"/admin/editing/editjob/{coffee_job.pk}/mask.png")
    assert response.status_code == 200
    assert staff_client.get(f"/admin/editing/editjob/{coffee_job.pk}/secret.png").status_code == 404


def test_admin_templates_list_shows_dropped_cache(staff_client, coffee_job):
    from django.utils import timezone

    from editing.models import CacheWarmup

    CacheWarmup.objects.create(
        template=coffee_job.template, seed=0, steps=4, guidance=30.0, variant="kv",
        status=JobStatus.SUCCEEDED, dropped_at=timezone.now(),
    )
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-cache_state">dropped</td>' in html


def test_admin_templates_list_counts_cache_hits(staff_client, coffee_job):
    EditJob.objects.filter(pk=coffee_job.pk).update(cache_outcome="hit")
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-cache_hits">1</td>' in html
    EditJob.objects.filter(pk=coffee_job.pk).update(cache_outcome="miss_full")
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-cache_hits">0</td>' in html


def test_admin_use_count_skips_cancelled_jobs(staff_client, coffee_job, monkeypatch):
    from editing import fleet, jobstate

    second = services.submit_job(
        owner=coffee_job.owner, template=coffee_job.template, mask=stroke_mask(60, 40) > 127, prompt="a red cup",
        seed=8, steps=4, guidance=12.5,
    )
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-use_count">2</td>' in html

    # A queued job is cancelled at once.
    assert services.cancel_job(coffee_job)
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-use_count">1</td>' in html

    # A running job asked to stop still counts until its worker stops it at the next step.
    monkeypatch.setattr(fleet, "process_gone", lambda hostname, since, workers=None: False)
    assert jobstate.claim(second.pk, worker="test-worker")
    assert services.cancel_job(second)
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-use_count">1</td>' in html
    assert jobstate.finish_cancelled(second.pk)
    html = staff_client.get("/admin/editing/template/").content.decode()
    assert '<td class="field-use_count">0</td>' in html


def test_admin_drop_cache_action_marks_warmups(staff_client, coffee_job):
    from editing.models import CacheWarmup

    warmup = CacheWarmup.objects.create(
        template=coffee_job.template, seed=0, steps=4, guidance=30.0, variant="kv", status="succeeded",
        cache_key="k" * 64,
    )
    response = staff_client.post(
        "/admin/editing/template/",
        {"action": "drop_cache", "_selected_action": [coffee_job.template_id]},
    )
    assert response.status_code == 302
    warmup.refresh_from_db()
    assert warmup.dropped_at is not None


def test_admin_job_fields_cannot_be_changed(staff_client, coffee_job):
    EditJob.objects.filter(pk=coffee_job.pk).update(status=JobStatus.SUCCEEDED)
    url = f"/admin/editing/editjob/{coffee_job.pk}/change/"
    detail = staff_client.get(url).content.decode()
    staff_client.post(url, {"prompt": "changed", "guidance": "99", "seed": "5", "cancel_requested": "on"})
    coffee_job.refresh_from_db()

    assert 'name="prompt"' not in detail
    assert 'name="guidance"' not in detail
    assert 'name="owner"' not in detail
    assert coffee_job.prompt != "changed"
    assert coffee_job.guidance != 99
    assert coffee_job.cancel_requested is False


def test_admin_warmup_model_cannot_be_changed(staff_client, coffee_job):
    from editing.models import CacheWarmup

    warmup = CacheWarmup.objects.create(template=coffee_job.template, seed=0, steps=4, guidance=30.0, variant="kv")
    detail = staff_client.get(f"/admin/editing/cachewarmup/{warmup.pk}/change/").content.decode()
    assert 'name="model"' not in detail


def test_admin_cancel_action_cancels_queued_job(staff_client, coffee_job):
    response = staff_client.post(
        "/admin/editing/editjob/", {"action": "cancel_jobs", "_selected_action": [str(coffee_job.pk)]}, follow=True
    )
    coffee_job.refresh_from_db()

    assert coffee_job.status == JobStatus.CANCELLED
    assert "Jobs cancelled: 1 (running ones stop after their current step). Already finished: 0." in (
        response.content.decode()
    )


def test_admin_job_list_percent_and_filter(staff_client, coffee_job):
    EditJob.objects.filter(pk=coffee_job.pk).update(mask_ratio=0.13157894736842105)
    html = staff_client.get("/admin/editing/editjob/").content.decode()
    assert '<td class="field-mask_percent">13.2%</td>' in html
    assert "0.13157894736842105" not in html

    none = staff_client.get("/admin/editing/editjob/?cache_outcome=none").content.decode()
    assert str(coffee_job.pk) in none
    assert "none (cancelled, failed or not finished)" in none
    EditJob.objects.filter(pk=coffee_job.pk).update(cache_outcome="hit")
    hits = staff_client.get("/admin/editing/editjob/?cache_outcome=hit").content.decode()
    misses = staff_client.get("/admin/editing/editjob/?cache_outcome=miss_full").content.decode()
    assert str(coffee_job.pk) in hits
    assert str(coffee_job.pk) not in misses
