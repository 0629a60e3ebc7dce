"""ProcessGroup shutdown order: the broker outlives the processes that use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from editor_site.stack import CELERY_COLD_SHUTDOWN, ProcessGroup

# On SIGTERM, wait a little (as a worker finishing its shutdown does), then record whether the process
# with pid argv[2] still runs (Linux /proc).
CHILD = """
import os, signal, sys, time
def on_term(*_):
    time.sleep(0.3)
    try:
        # A process that exited but was not reaped yet is a zombie, state Z.
        state = open(f"/proc/{sys.argv[2]}/stat").read().rsplit(")", 1)[1].split()[0]
        alive = "gone" if state == "Z" else "alive"
    except FileNotFoundError:
        alive = "gone"
    open(sys.argv[1], "w").write(alive)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + ".ready", "w").write("1")
while True:
    time.sleep(0.05)
"""


def test_stop_last_process_outlives_the_others(tmp_path: Path) -> None:
    group = ProcessGroup()
    broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    group.adopt("broker", broker, stop_last=True)
    report = tmp_path / "report"
    group.start("worker", [sys.executable, "-c", CHILD, str(report), str(broker.pid)])
    deadline = time.monotonic() + 10
    while not report.with_suffix(".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    group.stop(timeout_s=10)

    assert report.read_text() == "alive"
    assert broker.poll() is not None


# A Celery app whose one late-acknowledged task writes a file when it starts and then runs for 60 s.
SLOW_APP = """
import os, pathlib, time
from celery import Celery
app = Celery("slow_app", broker=os.environ["SLOW_BROKER"])
app.conf.task_acks_late = True
app.conf.worker_prefetch_multiplier = 1
app.conf.worker_hijack_root_logger = False
@app.task
def slow(marker):
    pathlib.Path(marker).write_text("started")
    time.sleep(60)
"""


def test_worker_stop_requeues_running_job(tmp_path: Path, redis_url: str, monkeypatch) -> None:
    import redis

    monkeypatch.setenv("SLOW_BROKER", redis_url)
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    queue = f"stop-test-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log_path = tmp_path / "worker.log"
    group = ProcessGroup()
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "slow_app", "worker", "--pool", "prefork", "--concurrency", "1",
             "-Q", queue, "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    group.adopt("celery worker", worker, leader_signal=CELERY_COLD_SHUTDOWN)
    client = redis.Redis.from_url(redis_url)
    try:
        sys.path.insert(0, str(tmp_path))
        import slow_app

        marker = tmp_path / "started"
        slow_app.slow.apply_async((str(marker),), queue=queue)
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), log_path.read_text()

        group.stop(timeout_s=30)

        log = log_path.read_text()
        assert "WorkerLostError" not in log
        assert "Traceback" not in log
        assert "Restoring 1 unacknowledged message" in log
        # The running job's message is back on its queue for the next start.
        assert client.llen(queue) == 1
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow_app", None)
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        client.delete(queue)
