"""Shared fixtures: users, API clients, a Redis broker and a real Celery worker process."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "demo" / "photos"
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Every Redis key of this test run carries this prefix, so concurrent runs sharing one Redis server
# never consume each other's messages.
BROKER_KEY_PREFIX = f"test-{uuid.uuid4().hex[:12]}:"


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def stroke_mask(width: int, height: int, *, x0: float = 0.3, x1: float = 0.6, y0: float = 0.4, y1: float = 0.55) -> np.ndarray:
    """A brush-stroke-like mask: a thick diagonal band, white on black, as an uint8 image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    band = np.abs((yy - y0 * height) - 0.3 * (xx - x0 * width)) < (y1 - y0) * height / 2
    mask[band & (xx >= x0 * width) & (xx <= x1 * width)] = 255
    return mask


def template_row(owner, name: str = "t"):
    """Create a Template row with a placeholder file, for tests that need a row but no real image."""
    from django.core.files.base import ContentFile

    from editing.models import Template

    template = Template(owner=owner, name=name, width=16, height=16, content_hash="0" * 64)
    template.image.save("t.png", ContentFile(b"x"), save=False)
    template.save()
    return template


def job_row(template, *, status: str = "queued", model: str = "flux", result: bool = False):
    """Create an EditJob row of `template` with a placeholder mask (and result), without sending it."""
    from django.core.files.base import ContentFile

    from editing.models import EditJob

    job = EditJob(
        owner=template.owner, template=template, model=model, prompt="p", seed=0, steps=4, guidance=30.0,
        mask_ratio=0.1, bucket="m10", queue_name=f"edit.{model}.m10", status=status,
    )
    job.mask.save("m.png", ContentFile(b"mask"), save=False)
    if result:
        job.result.save("r.png", ContentFile(b"result"), save=False)
    job.save()
    return job


def redis_reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test broker: Redis on 127.0.0.1:6379 db 15, or an embedded server when none runs."""
    from editor_site.celery import app as celery_app
    from editor_site.stack import start_embedded_redis

    process = None
    url = TEST_REDIS_URL
    if not redis_reachable(url):
        process, url = start_embedded_redis(ROOT / "var" / "test-redis")
    celery_app.conf.broker_url = url
    celery_app.conf.broker_transport_options = {
        **celery_app.conf.broker_transport_options, "global_keyprefix": BROKER_KEY_PREFIX,
    }
    yield url
    if process is not None:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def test_model_path() -> Path:
    """The tiny 'test' preset of the demo model, built once under var/ and reused across runs."""
    from workers.demo_model import ensure_demo_model

    return ensure_demo_model(ROOT / "var" / "models", "test")


@pytest.fixture(scope="session")
def session_media_root(tmp_path_factory) -> Path:
    """One media folder for the test run, shared with the worker processes the tests start."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture
def media_root(settings, session_media_root: Path) -> Path:
    settings.MEDIA_ROOT = session_media_root
    return session_media_root


def worker_database_url(django_db_blocker) -> str:
    """URL of the test database, for the processes the tests start."""
    from django.db import connection

    with django_db_blocker.unblock():
        config = connection.settings_dict
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    user = config.get("USER") or ""
    password = f":{config['PASSWORD']}" if config.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{config.get('HOST') or '127.0.0.1'}:{config.get('PORT') or 5432}/{config['NAME']}"


@pytest.fixture(scope="session")
def worker_env(
    redis_url: str, session_media_root: Path, test_model_path: Path, django_db_setup, django_db_blocker
) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        {
            "DEBUG": "1",
            "REDIS_URL": redis_url,
            "EDITOR_BROKER_KEY_PREFIX": BROKER_KEY_PREFIX,
            "DATABASE_URL": worker_database_url(django_db_blocker),
            "EDITOR_MEDIA_ROOT": str(session_media_root),
            "EDITOR_MODEL": str(test_model_path),
            "EDITOR_CACHE_DIR": str(session_media_root.parent / "activation-cache"),
            # Cost-model fits and other worker state of the test run stay out of the repository's var/.
            "EDITOR_VAR_DIR": str(session_media_root.parent / "worker-var"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def wait_for_worker(queues: list[str], timeout_s: float = 60.0) -> None:
    from editing.management.commands.edit import live_queues

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(queues) <= live_queues(timeout_s=1.0):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no worker consumed {queues} within {timeout_s:.0f} s")


@contextmanager
def running_worker(command: list[str], env: dict[str, str], queues: list[str], log_path: Path):
    """Start a Celery worker process, wait until it consumes `queues`, and stop it afterwards."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_worker(queues)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="session")
def celery_worker_session(worker_env: dict[str, str], tmp_path_factory):
    """A real Celery worker process (prefork pool) serving every bucket queue, shared by the test run."""
    from editing.routing import all_queues
    from editor_site.stack import worker_command

    queues = all_queues()
    command = worker_command(queues, name=f"test-{uuid.uuid4().hex[:8]}")
    with running_worker(command, worker_env, queues, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield process


@pytest.fixture
def cache_store(monkeypatch, tmp_path):
    """A fresh activation store of this process, with its disk tier under the test's directory."""
    from workers import template_cache

    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    template_cache.reset_store()
    yield template_cache.get_store()
    template_cache.reset_store()


@pytest.fixture
def celery_worker_process(celery_worker_session, transactional_db, media_root):
    """The shared worker, for a test whose rows it must see (committed, so transactional)."""
    if celery_worker_session.poll() is not None:
        pytest.fail(f"the test worker exited with code {celery_worker_session.returncode}")
    return celery_worker_session


@pytest.fixture
def make_user(django_user_model):
    def make(username: str = "alice"):
        return django_user_model.objects.create_user(username=username, password="pw-" + username)

    return make


@pytest.fixture
def api_client_for(make_user):
    from rest_framework.test import APIClient

    def make(username: str = "alice") -> APIClient:
        client = APIClient()
        client.force_authenticate(make_user(username))
        return client

    return make
