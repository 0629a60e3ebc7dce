"""Load test of the whole service: concurrent API clients submit small edit jobs and poll them.

Run `python -m bench.load --clients 50 --duration 60`. Without `--url` it starts its own stack on loopback:
embedded Redis, gunicorn (gthread), one Celery worker and the reconciler, on SQLite under var/bench/
(or DATABASE_URL), with the tiny test model. Each client owns a user and a template and loops: submit
a job, poll its status every `--poll-interval` seconds until it is final, repeat, until `--duration`
ends. Then the jobs still in flight get up to `--drain-timeout` seconds to finish.

Reported: accepted and completed jobs, lost jobs (accepted but not final, or succeeded without a stored
file), duplicated results (stored result files that no job references), responses with status >= 500
or no response, and P50/P99 latency of submit and status calls. Writes `<out>.json` and `<out>.md`.
With `--url` (a server started elsewhere) pass `--token`; lost jobs are then judged by the API only and
duplicated results are not counted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from editor_site.stack import (
    CELERY_COLD_SHUTDOWN,
    ProcessGroup,
    free_loopback_port,
    start_embedded_redis,
    wait_for_port,
    worker_command,
)

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
REQUEST_TIMEOUT_S = 60


@dataclass
class Stack:
    """A service started by this benchmark; ``database_url`` and ``media_root`` allow the final audit."""

    url: str
    tokens: list[str]
    database_url: str
    media_root: Path
    env: dict[str, str]
    group: ProcessGroup


@dataclass
class ClientStats:
    submit_ms: list[float] = field(default_factory=list)
    status_ms: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[int, int] = field(default_factory=dict)
    server_errors: int = 0
    final: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    accepted: int
    completed: int
    failed: int
    lost: int
    duplicated: int | None
    server_errors: int
    rejected: dict[str, int]
    submit_p50_ms: float
    submit_p99_ms: float
    status_p50_ms: float
    status_p99_ms: float
    submit_calls: int
    status_calls: int
    jobs_per_s: float
    drain_s: float
    steps: int
    image_px: int
    setup: str


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def manage(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args[:1])} failed: {result.stderr[-2000:]}")
    return result.stdout


CREATE_USERS = """
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
User = get_user_model()
for index in range({count}):
    user, _ = User.objects.get_or_create(username=f"load{{index}}")
    print(Token.objects.get_or_create(user=user)[0].key)
"""


def start_stack(run_dir: Path, clients: int, *, workers: int, web_threads: int) -> Stack:
    """Start Redis, gunicorn, a worker and the reconciler on loopback, with one user per client."""
    from workers.demo_model import ensure_demo_model

    model = ensure_demo_model(ROOT / "var" / "models", "test")
    env = os.environ.copy()
    database_url = env.get("DATABASE_URL") or f"sqlite:///{run_dir / 'db.sqlite3'}"
    media_root = run_dir / "media"
    env.update(
        {
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            # Plain HTTP on loopback: no TLS redirect.
            "SECURE_SSL_REDIRECT": "0",
            "DATABASE_URL": database_url,
            "EDITOR_VAR_DIR": str(run_dir),
            "EDITOR_MEDIA_ROOT": str(media_root),
            "EDITOR_CACHE_DIR": str(run_dir / "activation-cache"),
            "EDITOR_MODEL": str(model),
            "EDITOR_WARMUP_ON_CREATE": "0",
            "LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    group = ProcessGroup()
    try:
        redis_process, redis_url = start_embedded_redis(run_dir)
        group.adopt("embedded redis", redis_process, stop_last=True)
        env["REDIS_URL"] = redis_url
        manage(["migrate", "--noinput"], env)
        tokens = manage(["shell", "--verbosity", "0", "-c", CREATE_USERS.format(count=clients)], env).split()
        if len(tokens) != clients:
            raise RuntimeError(f"expected {clients} API tokens from manage.py shell; got {tokens[:5]}")
        from editing.routing import all_queues

        group.start(
            "celery worker", worker_command(all_queues(), name="load", concurrency=workers), env=env,
            leader_signal=CELERY_COLD_SHUTDOWN,
        )
        group.start("reconciler", [sys.executable, "manage.py", "reconcile_jobs", "--interval", "10"], env=env)
        port = free_loopback_port()
        web = group.start(
            "gunicorn",
            [
                sys.executable, "-m", "gunicorn", "editor_site.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2",
                "--worker-class", "gthread", "--threads", str(web_threads), "--timeout", "120",
                "--log-level", "warning",
            ],
            env=env,
        )
        wait_for_port(port, timeout_s=60, process=web)
    except BaseException:
        group.stop()
        raise
    return Stack(f"http://127.0.0.1:{port}", tokens, database_url, media_root, env, group)


def wait_for_worker(stack: Stack, timeout_s: float = 120.0) -> None:
    """Block until one job of the first user succeeds, so model loading is not counted as load."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {stack.tokens[0]}"
    template_id, mask = upload_template(session, stack.url, 64)
    job = session.post(f"{stack.url}/api/jobs/", data={"template": template_id, "prompt": "warm", "steps": 1},
                       files={"mask": ("m.png", mask)}, timeout=REQUEST_TIMEOUT_S).json()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if session.get(f"{stack.url}/api/jobs/{job['id']}/", timeout=REQUEST_TIMEOUT_S).json()["status"] in FINAL_STATUSES:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the worker did not finish a first job within {timeout_s:.0f} s")


def upload_template(session: requests.Session, url: str, size: int) -> tuple[int, bytes]:
    rng = np.random.default_rng()
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    response = session.post(f"{url}/api/templates/", files={"image": ("t.png", png(image))}, timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: size // 2, size // 4: 3 * size // 4] = 255
    return response.json()["id"], png(mask)


def run_client(
    url: str, token: str, *, size: int, steps: int, poll_interval_s: float, stop_at: float,
    drain_until: float, stats: ClientStats,
) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    template_id, mask = upload_template(session, url, size)
    sequence = 0
    while time.monotonic() < stop_at:
        sequence += 1
        start = time.perf_counter()
        try:
            response = session.post(
                f"{url}/api/jobs/",
                data={"template": template_id, "prompt": f"load test {sequence}", "steps": steps, "seed": sequence},
                files={"mask": ("m.png", mask)}, timeout=REQUEST_TIMEOUT_S,
            )
        except requests.RequestException:
            stats.server_errors += 1
            continue
        stats.submit_ms.append((time.perf_counter() - start) * 1000)
        if response.status_code >= 500:
            stats.server_errors += 1
            continue
        if response.status_code != 201:
            stats.rejected[response.status_code] = stats.rejected.get(response.status_code, 0) + 1
            time.sleep(float(response.headers.get("Retry-After", 1)))
            continue
        job_id = response.json()["id"]
        stats.accepted.append(job_id)
        # Poll until final; after the duration ends keep polling only until the drain deadline.
        while time.monotonic() < drain_until:
            time.sleep(poll_interval_s)
            start = time.perf_counter()
            try:
                status = session.get(f"{url}/api/jobs/{job_id}/", timeout=REQUEST_TIMEOUT_S)
            except requests.RequestException:
                stats.server_errors += 1
                continue
            stats.status_ms.append((time.perf_counter() - start) * 1000)
            if status.status_code >= 500:
                stats.server_errors += 1
                continue
            state = status.json().get("status")
            if state in FINAL_STATUSES:
                stats.final[job_id] = state
                break


def audit(stack: Stack, accepted: list[str]) -> tuple[dict[str, str], int, int]:
    """Read final states from the database and compare stored result files with the rows.

    Returns (status by accepted job id, succeeded jobs whose file is missing, files no job references).
    """
    script = (
        "import json; from editing.models import EditJob; "
        "print(json.dumps({str(j.pk): [j.status, j.result.name] for j in EditJob.objects.all()}))"
    )
    rows = json.loads(manage(["shell", "--verbosity", "0", "-c", script], stack.env).strip().splitlines()[-1])
    states = {job_id: rows.get(job_id, ["missing", ""])[0] for job_id in accepted}
    files = {str(path.relative_to(stack.media_root)) for path in (stack.media_root / "results").glob("*")}
    referenced = {name for status, name in rows.values() if name}
    missing_files = sum(1 for job_id in accepted if states[job_id] == "succeeded" and rows[job_id][1] not in files)
    return states, missing_files, len(files - referenced)


def wait_for_database(stack: Stack, accepted: list[str], timeout_s: float) -> float:
    """Poll the database until every accepted job is final or ``timeout_s`` passes; return seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        states, _, _ = audit(stack, accepted)
        if all(state in FINAL_STATUSES for state in states.values()):
            break
        time.sleep(2)
    return time.monotonic() - start


def run_clients(url: str, tokens: list[str], args: argparse.Namespace) -> tuple[list[ClientStats], float]:
    """Run one thread per client until the duration and the drain end; return their stats and the drain time."""
    stats = [ClientStats() for _ in range(args.clients)]
    stop_at = time.monotonic() + args.duration
    drain_until = stop_at + args.drain_timeout
    threads = [
        threading.Thread(
            target=run_client, args=(url, tokens[index]),
            kwargs={"size": args.size, "steps": args.steps, "poll_interval_s": args.poll_interval,
                    "stop_at": stop_at, "drain_until": drain_until, "stats": stats[index]},
            daemon=True,
        )
        for index in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, drain_until - time.monotonic() + REQUEST_TIMEOUT_S))
    return stats, max(0.0, time.monotonic() - stop_at)


def summarize(
    args: argparse.Namespace, stats: list[ClientStats], states: dict[str, str], *, missing_files: int,
    duplicated: int | None, drain_s: float, setup: str,
) -> LoadReport:
    completed = sum(1 for state in states.values() if state == "succeeded")
    rejected: dict[str, int] = {}
    for stat in stats:
        for code, count in stat.rejected.items():
            rejected[str(code)] = rejected.get(str(code), 0) + count
    submit_ms = [value for stat in stats for value in stat.submit_ms]
    status_ms = [value for stat in stats for value in stat.status_ms]
    return LoadReport(
        clients=args.clients,
        duration_s=args.duration,
        accepted=len(states),
        completed=completed,
        failed=sum(1 for state in states.values() if state == "failed"),
        lost=sum(1 for state in states.values() if state not in FINAL_STATUSES) + missing_files,
        duplicated=duplicated,
        server_errors=sum(stat.server_errors for stat in stats),
        rejected=rejected,
        submit_p50_ms=percentile(submit_ms, 50),
        submit_p99_ms=percentile(submit_ms, 99),
        status_p50_ms=percentile(status_ms, 50),
        status_p99_ms=percentile(status_ms, 99),
        submit_calls=len(submit_ms),
        status_calls=len(status_ms),
        jobs_per_s=round(completed / (args.duration + drain_s), 2),
        drain_s=round(drain_s, 1),
        steps=args.steps,
        image_px=args.size,
        setup=setup,
    )


def run_load(args: argparse.Namespace) -> LoadReport:
    run_dir = ROOT / "var" / "bench" / f"load-{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    stack: Stack | None = None
    if args.url:
        if not args.token:
            raise SystemExit("--url needs --token: the API token of a user on that server.")
        url, tokens = args.url.rstrip("/"), [args.token] * args.clients
    else:
        stack = start_stack(run_dir, args.clients, workers=args.workers, web_threads=args.web_threads)
        url, tokens = stack.url, stack.tokens

    try:
        if stack is not None:
            wait_for_worker(stack)
        stats, drain_s = run_clients(url, tokens, args)
        accepted = [job_id for stat in stats for job_id in stat.accepted]
        if stack is not None:
            drain_s += wait_for_database(stack, accepted, max(0.0, args.drain_timeout - drain_s))
            states, missing_files, duplicated = audit(stack, accepted)
        else:
            final = {job_id: state for stat in stats for job_id, state in stat.final.items()}
            states = {job_id: final.get(job_id, "unknown") for job_id in accepted}
            missing_files, duplicated = 0, None
    finally:
        if stack is not None:
            stack.group.stop()

    report = summarize(
        args, stats, states, missing_files=missing_files, duplicated=duplicated, drain_s=drain_s,
        setup=describe_setup(args, stack),
    )
    if stack is not None and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def describe_setup(args: argparse.Namespace, stack: Stack | None) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if stack is None:
        return f"server at {args.url}; clients on {machine}"
    database = "PostgreSQL" if stack.database_url.startswith("postgres") else "SQLite"
    return (
        f"gunicorn 2 processes x {args.web_threads} threads, 1 Celery worker (prefork, concurrency "
        f"{args.workers}), reconciler, embedded Redis, {database}, tiny test model; clients and servers on "
        f"one machine ({machine})"
    )


def write_report(report: LoadReport, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    lines = [
        "# Load test",
        "",
        f"`python -m bench.load --clients {report.clients} --duration {report.duration_s:g} --out "
        "docs/benchmarks/load`. "
        f"{report.clients} API clients, each with its own user and {report.image_px}x{report.image_px} template, "
        f"submit {report.steps}-step edit jobs for {report.duration_s:g} s in a closed loop: submit, poll the "
        f"status until final, repeat. The jobs in flight then get time to finish ({report.drain_s:g} s here).",
        "",
        f"Setup: {report.setup}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| jobs accepted | {report.accepted} |",
        f"| jobs completed (succeeded) | {report.completed} |",
        f"| jobs failed | {report.failed} |",
        f"| jobs lost | {report.lost} |",
        f"| duplicated results | {report.duplicated if report.duplicated is not None else 'not counted'} |",
        f"| responses >= 500 or none | {report.server_errors} |",
        f"| other rejections | {report.rejected or 'none'} |",
        f"| submit P50 / P99 | {report.submit_p50_ms} / {report.submit_p99_ms} ms ({report.submit_calls} calls) |",
        f"| status P50 / P99 | {report.status_p50_ms} / {report.status_p99_ms} ms ({report.status_calls} calls) |",
        f"| completed jobs per second | {report.jobs_per_s} |",
        "",
        "Lost: accepted but not final at the end, or succeeded without its stored file. Duplicated: stored "
        "result files that no job references. Throughput is bound by the single worker on a shared CPU, so the "
        "latencies measure the API under that load, not the model.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="Concurrent API clients (default 50).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of submitting (default 60).")
    parser.add_argument("--url", help="Base URL of a running server on this machine; default: start a stack.")
    parser.add_argument("--token", help="API token for --url.")
    parser.add_argument("--steps", type=int, default=2, help="Denoising steps per job (default 2).")
    parser.add_argument("--size", type=int, default=64, help="Template side in pixels (default 64).")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="Seconds between status calls (default 0.5).")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="Max seconds to wait for jobs in flight after the duration (default 300).")
    parser.add_argument("--workers", type=int, default=1, help="Celery pool processes (default 1).")
    parser.add_argument("--web-threads", type=int, default=16, help="Threads per gunicorn process (default 16).")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "load",
                        help="Report path without suffix (default var/bench/load).")
    parser.add_argument("--keep", action="store_true", help="Keep the run folder under var/bench/.")
    args = parser.parse_args()
    for name in ("clients", "steps", "size", "workers", "web_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.duration <= 0 or args.clients > 500:
        parser.error(f"--duration must be positive and --clients at most 500; got {args.duration}, {args.clients}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "editor_site.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    report = run_load(args)
    write_report(report, args.out)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
