"""Deleting templates: stored files go with their rows, and templates with active jobs are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.test import Client

from editing import services
from editing.models import EditJob, JobStatus, Template
from tests.conftest import job_row

pytestmark = pytest.mark.django_db


def make_job(template: Template, status: str) -> EditJob:
    return job_row(template, status=status, result=status == JobStatus.SUCCEEDED)


@pytest.fixture
def template(make_user, media_root, settings) -> Template:
    settings.EDITOR_WARMUP_ON_CREATE = False
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    return services.create_template(owner=make_user("alice"), name="banner", image=image)


def stored_paths(template: Template) -> list[str]:
    paths = [template.image.path]
    for job in template.jobs.all():
        paths.append(job.mask.path)
        if job.result:
            paths.append(job.result.path)
    return paths


def path_exists(path: str) -> bool:
    return Path(path).exists()


def test_api_delete_removes_files(template, api_client_for, django_capture_on_commit_callbacks):
    make_job(template, JobStatus.SUCCEEDED)
    make_job(template, JobStatus.FAILED)
    paths = stored_paths(template)
    assert len(paths) == 4
    assert all(path_exists(path) for path in paths)
    client = api_client_for("bob")
    client.force_authenticate(template.owner)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.delete(f"/api/templates/{template.pk}/")

    assert response.status_code == 204
    assert not Template.objects.filter(pk=template.pk).exists()
    assert EditJob.objects.count() == 0
    assert [path for path in paths if path_exists(path)] == []


def test_rollback_keeps_files(template, django_capture_on_commit_callbacks):
    make_job(template, JobStatus.SUCCEEDED)
    paths = stored_paths(template)

    # Without a commit the captured callbacks never run, as after a rollback.
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        template.delete()

    assert len(callbacks) == 3
    assert all(path_exists(path) for path in paths)


def test_admin_rejects_template_with_active_job(template, admin_user):
    running = make_job(template, JobStatus.RUNNING)
    admin = Client()
    admin.force_login(admin_user)

    page = admin.post(f"/admin/editing/template/{template.pk}/delete/", {"post": "yes"})
    action = admin.post(
        "/admin/editing/template/",
        {"action": "delete_selected", "_selected_action": [template.pk], "post": "yes"},
    )

    assert Template.objects.filter(pk=template.pk).exists()
    assert page.status_code == 200
    assert f"Job {running.pk} of template {template.pk} is running" in page.content.decode()
    assert action.status_code == 200
    assert f"Job {running.pk} of template {template.pk} is running" in action.content.decode()
    assert path_exists(template.image.path)


def test_admin_deletes_finished_template(template, admin_user, django_capture_on_commit_callbacks):
    make_job(template, JobStatus.CANCELLED)
    paths = stored_paths(template)
    admin = Client()
    admin.force_login(admin_user)

    with django_capture_on_commit_callbacks(execute=True):
        response = admin.post(f"/admin/editing/template/{template.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not Template.objects.filter(pk=template.pk).exists()
    assert [path for path in paths if path_exists(path)] == []


def test_api_deletes_finished_job_only(template, api_client_for, django_capture_on_commit_callbacks):
    finished = make_job(template, JobStatus.SUCCEEDED)
    running = make_job(template, JobStatus.RUNNING)
    paths = [finished.mask.path, finished.result.path]
    owner = api_client_for("bob")
    owner.force_authenticate(template.owner)
    stranger = api_client_for("carol")

    rejected = owner.delete(f"/api/jobs/{running.pk}/")
    hidden = stranger.delete(f"/api/jobs/{finished.pk}/")
    with django_capture_on_commit_callbacks(execute=True):
        deleted = owner.delete(f"/api/jobs/{finished.pk}/")

    assert rejected.status_code == 409
    assert rejected.json()["detail"] == (
        f"Job {running.pk} is running; cancel it first (POST /api/jobs/{running.pk}/cancel/), then delete it."
    )
    assert hidden.status_code == 404
    assert deleted.status_code == 204
    assert list(EditJob.objects.values_list("pk", flat=True)) == [running.pk]
    assert [path for path in paths if path_exists(path)] == []
