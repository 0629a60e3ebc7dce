"""Faults against real processes: killed workers, a restarted Redis, a dropped database connection,
time limits, out-of-memory and unwritable media, and cancel in every job state.

The worker tests run on a private Redis server, started here so that it can be restarted, with their own
worker processes and media folder. Every job must end in a final state, with exactly one stored result
per succeeded job.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from django.core.files.uploadedfile import SimpleUploadedFile

from editing import jobstate, reconciler, services
from editing.models import CacheWarmup, EditJob, JobStatus
from editor_site.celery import app as celery_app
from editor_site.stack import free_loopback_port, redis_server_binary, wait_for_port, worker_command
from tests.conftest import ROOT, png_bytes
from workers import execution

pytestmark = pytest.mark.django_db(transaction=True)

# Workers take over a running job after this many seconds without progress (the settings' minimum).
STALE_S = 10
REQUEUE_AFTER_S = 2
FINAL_TIMEOUT_S = 120
SIZE = 256
# Side of the templates of long jobs (100 steps), which must still be running seconds after they start.
LONG_SIZE = 384
FAULT_QUEUE = "edit.faults"


@dataclass
class RedisServer:
    """A private redis-server on a fixed loopback port that the test can stop and start again."""

    data_dir: Path
    port: int = field(default_factory=free_loopback_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.data_dir), "--logfile", str(self.data_dir / "redis.log"),
            ],
            start_new_session=True,
        )
        wait_for_port(self.port, timeout_s=15, process=self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@dataclass
class Workers:
    """Celery worker processes of this module, by short name."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    hostnames: dict[str, str] = field(default_factory=dict)
    warmed: set[str] = field(default_factory=set)

    def start(self, name: str, queues: list[str], env: dict[str, str] | None = None) -> None:
        """Start a worker; EDITOR_ENGINE_MAX_BATCH above 1 in its environment gives it the threads pool."""
        node = f"{name}-{uuid.uuid4().hex[:6]}"
        batch = int((env or self.env).get("EDITOR_ENGINE_MAX_BATCH", "1"))
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                worker_command(queues, name=node, batch=batch), cwd=ROOT, env=env or self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.hostnames[name] = node

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replies = celery_app.control.inspect(timeout=1.0).ping() or {}
            alive = {hostname.split("@")[0] for hostname in replies}
            if set(self.hostnames.values()) <= alive:
                return
            for name, process in self.processes.items():
                assert process.poll() is None, f"worker {name} exited: {self.log(name)[-2000:]}"
        raise TimeoutError(f"workers {sorted(self.hostnames)} did not answer within {timeout_s:.0f} s")

    def name_of(self, hostname: str) -> str:
        return next(name for name, node in self.hostnames.items() if hostname.startswith(f"{node}@"))

    def kill(self, name: str) -> None:
        """SIGKILL the worker's whole process group: the main process and its pool child."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=10)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def point_celery_at(url: str) -> None:
    """Send this process's Celery messages and control commands to ``url`` from now on.

    Celery 5.7 keeps its connection pool and producer pool once created, and ``app.close()`` resets
    only the first, so both references are dropped here. The pools stay open in kombu's registry,
    keyed by URL, and are reused when the URL is set back.
    """
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    celery_app.conf.broker_url = url


@pytest.fixture(scope="module")
def fault_redis(redis_url: str, tmp_path_factory):
    """The private Redis, with this process's Celery client pointed at it for the module."""
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    server.start()
    point_celery_at(server.url)
    yield server
    point_celery_at(redis_url)
    server.stop()


@pytest.fixture(scope="module")
def fault_media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-media")


@pytest.fixture(scope="module")
def broken_media(fault_media: Path, tmp_path_factory) -> Path:
    """A media root whose inputs are readable but where no result can be written.

    The tests run as root, which ignores permission bits, so ``results`` is a regular file: creating
    a file under it fails with an OSError like a read-only or full disk does.
    """
    root = tmp_path_factory.mktemp("broken-media")
    for folder in ("templates", "masks"):
        (fault_media / folder).mkdir(exist_ok=True)
        (root / folder).symlink_to(fault_media / folder)
    (root / "results").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def workers(worker_env, fault_redis: RedisServer, fault_media: Path, broken_media: Path, tmp_path_factory):
    env = {
        **worker_env, "REDIS_URL": fault_redis.url, "EDITOR_MEDIA_ROOT": str(fault_media),
        "EDITOR_STALE_RUNNING_S": str(STALE_S), "EDITOR_REQUEUE_AFTER_S": str(REQUEUE_AFTER_S),
    }
    pool = Workers(env=env, log_dir=tmp_path_factory.mktemp("fault-workers"))
    from editing.routing import all_queues

    pool.start("a", all_queues())
    pool.start("b", all_queues())
    pool.start("broken", [FAULT_QUEUE], env={**env, "EDITOR_MEDIA_ROOT": str(broken_media)})
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(autouse=True)
def fault_settings(settings, fault_media: Path) -> None:
    settings.MEDIA_ROOT = fault_media
    settings.EDITOR_WARMUP_ON_CREATE = False
    settings.EDITOR_JOB_SUBMIT_RATE = None


def result_files(media: Path) -> list[Path]:
    folder = media / "results"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def submit_full_mask_job(client, *, steps: int, send: bool = True, monkeypatch=None) -> EditJob:
    """Upload a template and submit a job whose mask covers it all, so no warm-up or cache runs."""
    size = LONG_SIZE if steps >= 100 else SIZE
    rng = np.random.default_rng(steps)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    response = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("t.png", png_bytes(image))}, format="multipart"
    )
    assert response.status_code == 201, response.content
    if not send:
        monkeypatch.setattr(services, "enqueue", lambda job, chosen=None: None)
    mask = np.full((size, size), 255, dtype=np.uint8)
    response = client.post(
        "/api/jobs/",
        {"template": response.json()["id"], "mask": SimpleUploadedFile("m.png", png_bytes(mask)),
         "prompt": "a red cup", "steps": steps},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    if not send:
        monkeypatch.undo()
    return EditJob.objects.get(pk=response.json()["id"])


def reconcile_quietly() -> None:
    try:
        reconciler.reconcile_once(requeue_after_s=REQUEUE_AFTER_S, stale_after_s=STALE_S)
    except redis.RedisError:
        pass  # Redis is restarting; the next pass tries again.


def wait_until_final(job_ids: list, *, reconcile: bool = True, timeout_s: float = FINAL_TIMEOUT_S) -> list[EditJob]:
    """Wait until every job is final, running reconcile passes as the reconciler service does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = list(EditJob.objects.filter(pk__in=job_ids))
        if all(job.is_final for job in jobs):
            return jobs
        if reconcile:
            reconcile_quietly()
        time.sleep(0.5)
    states = {str(job.pk): job.status for job in EditJob.objects.filter(pk__in=job_ids)}
    raise AssertionError(f"jobs not final within {timeout_s:.0f} s: {states}")


def wait_until_running(job: EditJob, *, min_progress: float = 0.0, timeout_s: float = 60.0) -> EditJob:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status == JobStatus.RUNNING and job.progress > min_progress:
            return job
        assert not job.is_final, f"job {job.pk} finished as {job.status} before it was seen running"
        time.sleep(0.05)
    raise AssertionError(f"job {job.pk} did not start within {timeout_s:.0f} s")


@pytest.fixture
def warm_workers(api_client_for, workers) -> None:
    """Let workers a and b each finish one job first.

    A pool child imports torch and loads the model inside its first task, so a short time limit on
    that task would expire before the job is even claimed. With prefetch 1 a busy worker fetches
    nothing more, so two jobs submitted together go to both workers.
    """
    client = api_client_for("warm-up")
    for _ in range(4):
        jobs = wait_until_final([submit_full_mask_job(client, steps=2).pk for _ in range(2)])
        workers.warmed |= {workers.name_of(job.worker) for job in jobs}
        if {"a", "b"} <= workers.warmed:
            return
    raise AssertionError(f"only workers {sorted(workers.warmed)} ran a job")


# --- Warm-ups requested for every worker.


def test_warm_all_runs_on_each_requested_worker(api_client_for, workers):
    client = api_client_for("alice")
    image = np.random.default_rng(11).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    template = client.post(
        "/api/templates/", {"image": SimpleUploadedFile("t.png", png_bytes(image))}, format="multipart"
    ).json()
    response = client.post(f"/api/templates/{template['id']}/warm-all/", {"steps": 2}, format="json")
    assert response.status_code == 202, response.content
    requested = {row["target_worker"] for row in response.json()}
    assert {workers.hostnames["a"], workers.hostnames["b"]} <= {name.split("@")[0] for name in requested}

    deadline = time.monotonic() + FINAL_TIMEOUT_S
    rows = CacheWarmup.objects.filter(template_id=template["id"])
    while rows.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).exists():
        assert time.monotonic() < deadline, "the warm-ups did not finish"
        time.sleep(0.2)
    for row in rows:
        assert row.status == JobStatus.SUCCEEDED, row.error
        assert row.worker == row.target_worker
    assert len({row.cache_key for row in rows}) == 1


# --- Cancel in every state.


def test_cancel_queued_job_is_never_run(api_client_for, workers, monkeypatch):
    client = api_client_for("alice")
    job = submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch)

    response = client.post(f"/api/jobs/{job.pk}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert jobstate.claim(job.pk, worker="late-worker", allow_restart=True) is False
    EditJob.objects.filter(pk=job.pk).update(updated_at=job.updated_at.replace(year=2000))
    report = reconciler.reconcile_once(requeue_after_s=REQUEUE_AFTER_S, stale_after_s=STALE_S)
    assert str(job.pk) not in report.requeued_jobs
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert not job.result


def test_cancel_running_job_stores_nothing(api_client_for, workers, fault_media):
    client = api_client_for("alice")
    before = result_files(fault_media)
    job = wait_until_running(submit_full_mask_job(client, steps=100))

    assert client.post(f"/api/jobs/{job.pk}/cancel/").status_code == 200

    (job,) = wait_until_final([job.pk])
    assert job.status == JobStatus.CANCELLED
    assert not job.result
    assert result_files(fault_media) == before
    assert client.post(f"/api/jobs/{job.pk}/cancel/").status_code == 409
    # The phases it ran are kept: its inputs were read and the edit ran until the cancel.
    assert job.timings["load"] > 0
    assert job.timings["edit_until_cancel"] > 0
    assert "store" not in job.timings


def test_cancel_finished_job_is_conflict(api_client_for, workers, fault_media):
    client = api_client_for("alice")
    (job,) = wait_until_final([submit_full_mask_job(client, steps=2).pk])
    assert job.status == JobStatus.SUCCEEDED, job.error

    response = client.post(f"/api/jobs/{job.pk}/cancel/")

    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED
    assert (fault_media / job.result.name).is_file()


# --- Time limits and resource faults.


def test_soft_time_limit_fails_job_with_reason(api_client_for, workers, warm_workers, monkeypatch):
    client = api_client_for("alice")
    job = submit_full_mask_job(client, steps=100, send=False, monkeypatch=monkeypatch)

    # The message carries its own limits, as a deployment's CELERY_TASK_SOFT_TIME_LIMIT would set them.
    celery_app.send_task(
        services.RUN_EDIT_TASK, args=[str(job.pk)], queue=job.queue_name, soft_time_limit=0.5, time_limit=60
    )

    (job,) = wait_until_final([job.pk])
    assert job.status == JobStatus.FAILED
    assert "timed out" in job.error
    assert "0.5 s" in job.error
    assert not job.result
    response = client.post(f"/api/jobs/{job.pk}/cancel/")
    assert response.status_code == 409
    assert "failed" in response.json()["detail"]


def test_interrupted_job_fails_after_max_attempts(api_client_for, monkeypatch):
    client = api_client_for("alice")
    job = submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch)
    EditJob.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempts=execution.MAX_ATTEMPTS)

    execution.execute_job(str(job.pk), worker="in-process", redelivered=True)

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert f"interrupted {execution.MAX_ATTEMPTS} times" in job.error
    assert not job.result


def test_unwritable_media_fails_job_worker_lives(api_client_for, workers, broken_media, monkeypatch):
    client = api_client_for("alice")
    jobs = [submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch) for _ in range(2)]

    for job in jobs:
        celery_app.send_task(services.RUN_EDIT_TASK, args=[str(job.pk)], queue=FAULT_QUEUE)

    # No reconcile passes: they watch only the bucket queues and would re-send these jobs there.
    finished = wait_until_final([job.pk for job in jobs], reconcile=False)
    for job in finished:
        assert job.status == JobStatus.FAILED
        assert "could not be stored" in job.error
        assert "EDITOR_MEDIA_ROOT" in job.error
    assert workers.processes["broken"].poll() is None
    assert broken_media.joinpath("results").is_file()


def fake_result() -> tuple[SimpleNamespace, SimpleNamespace]:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    decision = SimpleNamespace(outcome="bypass", key=None, flop_fraction=1.0, queue_warmup=False)
    return SimpleNamespace(image=image, timings_ms={}), decision


def test_out_of_memory_retries_at_smaller_size(api_client_for, fault_media, monkeypatch):
    client = api_client_for("alice")
    job = submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch)
    sizes: list[int] = []

    def run_job(job, timings, runner_settings, **kwargs):
        sizes.append(runner_settings.max_work_pixels)
        if len(sizes) == 1:
            raise MemoryError("simulated allocation failure")
        return fake_result()

    monkeypatch.setattr(execution, "run_job", run_job)
    execution.execute_job(str(job.pk), worker="in-process")

    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert sizes == [sizes[0], sizes[0] // execution.OOM_SHRINK_FACTOR]
    assert (fault_media / job.result.name).is_file()


def test_out_of_memory_twice_fails_with_message(api_client_for, monkeypatch):
    import torch

    client = api_client_for("alice")
    job = submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch)

    def run_job(job, timings, runner_settings, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(execution, "run_job", run_job)
    execution.execute_job(str(job.pk), worker="in-process")

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "ran out of memory" in job.error
    assert "EDITOR_MAX_WORK_PIXELS" in job.error
    assert not job.result


def test_full_disk_message_names_the_fix():
    message = execution.storage_failure(OSError(errno.ENOSPC, "No space left on device")).english()
    assert "disk is full" in message
    assert "free disk space" in message


# --- Lost messages and dead processes.


def test_reconciler_resends_only_missing_messages(api_client_for, workers, monkeypatch):
    client = api_client_for("alice")
    lost = submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch)
    EditJob.objects.filter(pk=lost.pk).update(updated_at=lost.updated_at.replace(year=2000))

    first = reconciler.reconcile_once(requeue_after_s=REQUEUE_AFTER_S, stale_after_s=STALE_S)
    second = reconciler.reconcile_once(requeue_after_s=REQUEUE_AFTER_S, stale_after_s=STALE_S)

    assert first.requeued_jobs == [str(lost.pk)]
    assert second.requeued_jobs == []
    (job,) = wait_until_final([lost.pk])
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1


def test_reconciler_sees_unacked_and_priority_messages(api_client_for, fault_redis, monkeypatch):
    from editor_site import redis_keys

    client = api_client_for("alice")
    jobs = [submit_full_mask_job(client, steps=2, send=False, monkeypatch=monkeypatch) for _ in range(2)]
    EditJob.objects.filter(pk__in=[job.pk for job in jobs]).update(updated_at=jobs[0].updated_at.replace(year=2000))
    redis_client = redis_keys.client()
    prefix = redis_keys.key_prefix()
    raw_messages = []
    for job in jobs:
        # A queue no worker consumes, so the messages stay put and can be moved by hand.
        celery_app.send_task(services.RUN_EDIT_TASK, args=[str(job.pk)], queue="edit.parked")
        raw_messages.append(redis_client.rpop(f"{prefix}edit.parked"))
    unacked_key = f"{prefix}{reconciler.KOMBU_UNACKED_KEY}"
    priority_key = f"{prefix}edit.parked{reconciler.KOMBU_PRIORITY_SEPARATOR}9"
    # A worker that received the first message keeps it in the unacknowledged hash as
    # [message, exchange, routing key]; the second waits in the priority-9 list of edit.parked.
    redis_client.hset(unacked_key, "parked-tag", json.dumps([json.loads(raw_messages[0]), "", "edit.parked"]))
    redis_client.lpush(priority_key, raw_messages[1])

    try:
        found = reconciler.broker_arguments(redis_client, prefix, ["edit.parked"])
        report = reconciler.reconcile_once(requeue_after_s=REQUEUE_AFTER_S, stale_after_s=STALE_S)
    finally:
        redis_client.hdel(unacked_key, "parked-tag")
        redis_client.delete(priority_key)

    assert found == {str(jobs[0].pk), str(jobs[1].pk)}
    # The reconciler watches only the service's queues: the unacknowledged message counts, while
    # the one parked on another queue looks missing and is re-sent to the job's bucket queue.
    assert report.in_broker == 1
    assert report.requeued_jobs == [str(jobs[1].pk)]


def test_redis_restart_loses_no_queued_job(api_client_for, workers, fault_redis, fault_media):
    client = api_client_for("alice")
    before = result_files(fault_media)
    jobs = [submit_full_mask_job(client, steps=20) for _ in range(4)]

    # An empty Redis comes back: every queued message and the unacknowledged hash are gone.
    fault_redis.stop()
    fault_redis.start()

    finished = wait_until_final([job.pk for job in jobs])
    assert [job.status for job in finished] == [JobStatus.SUCCEEDED] * 4, [job.error for job in finished]
    new_files = sorted(set(result_files(fault_media)) - set(before))
    assert len(new_files) == 4
    assert sorted(fault_media / job.result.name for job in finished) == new_files



def test_dropped_database_connection_retries_job(api_client_for, workers, fault_media):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no server connection to drop; this runs in the PostgreSQL pass of make test")
    client = api_client_for("alice")
    before = result_files(fault_media)
    job = wait_until_running(submit_full_mask_job(client, steps=100), min_progress=0.05)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    (job,) = wait_until_final([job.pk])
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts >= 2
    assert sorted(set(result_files(fault_media)) - set(before)) == [fault_media / job.result.name]


def check_killed_worker_job_completes_once(client, workers: Workers, fault_media: Path) -> None:
    """Kill the worker of a running job and check that the job succeeds once on another worker."""
    before = result_files(fault_media)
    job = wait_until_running(submit_full_mask_job(client, steps=100), min_progress=0.05)
    victim = workers.name_of(job.worker)

    workers.kill(victim)

    (job,) = wait_until_final([job.pk])
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    assert workers.name_of(job.worker) != victim
    assert sorted(set(result_files(fault_media)) - set(before)) == [fault_media / job.result.name]


def test_killed_worker_job_completes_once(api_client_for, workers, fault_media):
    check_killed_worker_job_completes_once(api_client_for("alice"), workers, fault_media)


def test_warm_shutdown_finishes_job_in_hand(api_client_for, workers, fault_media):
    client = api_client_for("alice")
    before = result_files(fault_media)
    job = wait_until_running(submit_full_mask_job(client, steps=100), min_progress=0.05)
    name = workers.name_of(job.worker)

    # SIGTERM to the main process only, as `docker stop` sends it: Celery's warm shutdown.
    workers.processes[name].send_signal(signal.SIGTERM)

    (job,) = wait_until_final([job.pk], reconcile=False)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1
    assert workers.name_of(job.worker) == name
    assert workers.processes[name].wait(timeout=60) == 0
    assert sorted(set(result_files(fault_media)) - set(before)) == [fault_media / job.result.name]
