"""Failure reasons are stored as codes and read back in the reader's language (API, history page, admin)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.utils import translation

from editing import jobstate, warmups
from editing.failures import MESSAGES, Failure, exception_failure, localized_error
from editing.models import CacheWarmup, EditJob, JobStatus
from tests.conftest import job_row, template_row
from tests.test_i18n import JAPANESE

pytestmark = pytest.mark.django_db

SAMPLE_PARAMS = {
    "interrupted": {"attempts": 3},
    "disk_full": {"detail": "[Errno 28] No space left on device"},
    "storage": {"detail": "PermissionError: [Errno 13] Permission denied"},
    "timed_out": {"limit": "600"},
    "out_of_memory": {"pixels": 1048576, "smaller": 524288, "detail": "MemoryError"},
    "edit_error": {"detail": "RuntimeError: boom"},
    "warmup_error": {"detail": "RuntimeError: boom", "template": 7},
}


@pytest.fixture
def job(make_user, media_root) -> EditJob:
    return job_row(template_row(make_user("alice")))


def test_every_code_translated():
    assert set(SAMPLE_PARAMS) == set(MESSAGES)
    for code, params in SAMPLE_PARAMS.items():
        failure = Failure(code, params)
        english = failure.english()
        with translation.override("ja"):
            japanese = failure.text()
        assert JAPANESE.search(japanese), (code, japanese)
        assert not JAPANESE.search(english), (code, english)
        # The parameters reach both texts.
        for value in params.values():
            assert str(value) in english, (code, value)
            assert str(value) in japanese, (code, value)


def test_unknown_code_rejected():
    with pytest.raises(ValueError, match="Unknown failure code 'nope'"):
        Failure("nope")


def test_rows_without_code_show_stored_text():
    assert localized_error("Old message", "", {}) == "Old message"
    assert localized_error("Old message", "removed_code", {"x": 1}) == "Old message"
    # Parameters that do not fit the template fall back to the stored text instead of raising.
    assert localized_error("Old message", "timed_out", {}) == "Old message"


def test_failed_job_api_language(job, api_client_for):
    client = api_client_for("bob")
    client.force_authenticate(job.owner)
    assert jobstate.claim(job.pk, worker="w1")
    assert jobstate.fail(job.pk, failure=Failure("timed_out", {"limit": "600"}))
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error_code == "timed_out"
    with translation.override("en"):
        assert job.error == job.error_text
    assert "time limit of 600 s" in job.error

    english = client.get(f"/api/jobs/{job.pk}/", HTTP_ACCEPT_LANGUAGE="en").json()["error"]
    japanese = client.get(f"/api/jobs/{job.pk}/", HTTP_ACCEPT_LANGUAGE="ja").json()["error"]
    assert english == job.error
    assert japanese != english
    assert JAPANESE.search(japanese)
    assert "600" in japanese
    assert "EDITOR_JOB_SOFT_TIME_LIMIT_S" in japanese


def test_exception_detail_in_both_languages(job):
    assert jobstate.claim(job.pk, worker="w1")
    assert jobstate.fail(job.pk, failure=exception_failure("edit_error", RuntimeError("tensor shapes differ")))
    job.refresh_from_db()
    assert "RuntimeError: tensor shapes differ" in job.error
    with translation.override("ja"):
        assert "RuntimeError: tensor shapes differ" in job.error_text
        assert JAPANESE.search(job.error_text)


def test_succeeded_job_has_no_failure(job):
    assert jobstate.claim(job.pk, worker="w1")
    assert jobstate.succeed(job.pk, result_name="results/r.png", timings={"denoise": 1.0})
    job.refresh_from_db()
    assert (job.error, job.error_code, job.error_params) == ("", "", {})


def test_history_and_admin_in_japanese(job, admin_user):
    assert jobstate.claim(job.pk, worker="w1")
    assert jobstate.fail(job.pk, failure=Failure("interrupted", {"attempts": 3}))
    with translation.override("ja"):
        japanese = Failure("interrupted", {"attempts": 3}).text()

    owner = Client()
    owner.force_login(job.owner)
    history = owner.get("/history/", HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert japanese in history

    admin = Client()
    admin.force_login(admin_user)
    page = admin.get(f"/admin/editing/editjob/{job.pk}/change/", HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert japanese in page
    english = admin.get(f"/admin/editing/editjob/{job.pk}/change/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "interrupted 3 times" in english


def test_failed_warmup_localized(job):
    warmup = CacheWarmup.objects.create(
        template=job.template, requested_by=job.owner, model=job.model, seed=0, steps=4, guidance=30.0,
        variant="kv", status=JobStatus.RUNNING,
    )
    failure = exception_failure("warmup_error", OSError("disk gone"), template=job.template_id)
    assert warmups.fail(warmup.pk, failure=failure)
    warmup.refresh_from_db()
    assert warmup.error_code == "warmup_error"
    with translation.override("ja"):
        assert "OSError: disk gone" in warmup.error_text
        assert JAPANESE.search(warmup.error_text)
    assert "OSError: disk gone" in warmup.error
    assert f"POST /api/templates/{job.template_id}/warm/" in warmup.error
