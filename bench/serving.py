"""Serving benchmark: a request trace replayed through the whole stack, for four worker configurations.

Run `python -m bench.serving` (writes docs/benchmarks/serving.{json,environment.json,md,png}) or add
`--quick` (tiny test model, two systems, one rate per mask set, under two minutes; writes under var/bench/).

Each system gets a fresh stack on loopback: embedded Redis, gunicorn, the job reconciler and two separate
Celery worker processes (concurrency 1 each, own names, both consuming every queue), on SQLite in a run
folder under var/bench/. The systems differ only in the service's own settings (`SYSTEMS`):

* `baseline`: no activation cache (stock diffusers on every job), one request per engine step, bucket queues;
* `masked`: cached activations, masked tokens only, one request per step, bucket queues;
* `batched`: as `masked`, up to four requests per engine step;
* `routed`: as `batched`, with cost-based routing of jobs to workers.

Before the timed trace the templates are uploaded and, for cache systems, warmed. Each worker has its own
cache, so by default every template is warmed on every worker (`POST /api/templates/{id}/warm-all/`), as in
a service whose templates have been in use for a while; `--warm-on one` warms each template on whichever
worker takes it. Then each worker completes one untimed job, so model loading is not timed.

The trace has Poisson arrivals and Zipf template popularity. Mask token ratios come from a Beta distribution
with the set's mean, built as brush ellipses at random places. Seed, steps and guidance are fixed so caches
apply. One seeded request sequence per mask set is replayed at every rate (arrival gaps scaled by 1 / rate) and for
every system. Rates are multiples of the baseline's capacity, measured by a burst of jobs on the baseline
stack before its trace.

Latency is the job's `finished_at` minus the client's clock at submission (same machine), throughput the
completed jobs over (last finish - first submission).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageOps

from bench.load import CREATE_USERS, FINAL_STATUSES, REQUEST_TIMEOUT_S, manage, png
from editing.imaging import mask_ratio
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
PHOTOS = ROOT / "demo" / "photos"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")

# Token geometry of Flux (VAE factor 8, 2x2 packing) and the service's default mask dilation
# (EDITOR_MASK_DILATION_TOKENS), so the built masks have the ratio the API will measure.
PATCH_PX = 16
DILATION_TOKENS = 1
# Upper clip of the mask ratio distribution: below the 90% FLOP fraction at which the worker runs the stock
# pipeline anyway. The lower clip is the smallest brush, one token before dilation.
MAX_MASK_RATIO = 0.85
STRATIFIED_POOL = 200_000
PROMPTS = (
    "a red ceramic cup",
    "replace it with a bouquet of yellow flowers",
    "a small wooden boat",
    "paint it deep blue metallic",
    "a sleeping cat",
    "old red brick with moss",
)

# A rate is kept up when every job completed and throughput reached this share of the offered rate.
KEEP_UP_FRACTION = 0.8
POLL_INTERVAL_S = 1.0
SUBMIT_THREADS = 16
STARTUP_TIMEOUT_S = 120.0
WARMUP_TIMEOUT_S = 600.0
CANCEL_WAIT_S = 120.0
PRIMING_ROUNDS = 4


# --- Systems -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """One service configuration: its name in the report and the environment settings that make it."""

    name: str
    env: dict[str, str]

    @property
    def cache_enabled(self) -> bool:
        return self.env["EDITOR_CACHE_ENABLED"] == "1"


SYSTEMS: tuple[System, ...] = (
    System("baseline", {"EDITOR_CACHE_ENABLED": "0", "EDITOR_ENGINE_MAX_BATCH": "1", "EDITOR_ROUTING": "bucket"}),
    System("masked", {"EDITOR_CACHE_ENABLED": "1", "EDITOR_ENGINE_MAX_BATCH": "1", "EDITOR_ROUTING": "bucket"}),
    System("batched", {"EDITOR_CACHE_ENABLED": "1", "EDITOR_ENGINE_MAX_BATCH": "4", "EDITOR_ROUTING": "bucket"}),
    System("routed", {"EDITOR_CACHE_ENABLED": "1", "EDITOR_ENGINE_MAX_BATCH": "4", "EDITOR_ROUTING": "cost"}),
)
BASELINE = "baseline"
FULL_SYSTEM = "routed"
WORKER_NAMES = ("w1", "w2")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run. `full_config` and `quick_config` build the two that are used."""

    preset: str
    size: int
    steps: int
    guidance: float
    seed: int
    templates: int
    zipf_exponent: float
    beta_concentration: float
    mask_means: tuple[float, ...]
    rate_multiples: tuple[float, ...]
    requests_per_rate: int
    calibration_jobs: int
    systems: tuple[str, ...]
    out_dir: Path
    quick: bool
    # "every": each template is warmed on every worker (POST .../warm-all/), the steady state of a service
    # whose templates are all in use. "one": one warm-up per template, on whichever worker takes it.
    warm_on: str = "every"


def full_config() -> BenchConfig:
    return BenchConfig(
        preset="demo", size=384, steps=16, guidance=30.0, seed=0, templates=8, zipf_exponent=1.0,
        beta_concentration=12.0, mask_means=(0.11, 0.19), rate_multiples=(0.5, 0.9, 1.5, 3.0, 6.0),
        requests_per_rate=30, calibration_jobs=8, systems=tuple(system.name for system in SYSTEMS),
        out_dir=ROOT / "docs" / "benchmarks", quick=False,
    )


def quick_config() -> BenchConfig:
    return BenchConfig(
        preset="test", size=256, steps=4, guidance=30.0, seed=0, templates=4, zipf_exponent=1.0,
        beta_concentration=12.0, mask_means=(0.11, 0.19), rate_multiples=(1.5,), requests_per_rate=8,
        calibration_jobs=4, systems=(BASELINE, FULL_SYSTEM), out_dir=ROOT / "var" / "bench", quick=True,
    )


# --- Trace -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRequest:
    """One request at unit rate: `unit_arrival_s` divided by the rate gives its submission offset."""

    index: int
    unit_arrival_s: float
    template: int
    mask_ratio: float
    center: tuple[float, float]  # (row, col) of the brush ellipse, as fractions of the image side
    aspect: float  # height / width of the ellipse
    prompt: str


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    """Return the popularity of items ranked 0 (most popular) to count - 1: weight ~ 1 / (rank + 1)^exponent."""
    if count < 1 or exponent < 0:
        raise ValueError(f"count={count} must be at least 1 and exponent={exponent} at least 0")
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def beta_parameters(mean: float, concentration: float) -> tuple[float, float]:
    """Return the parameters (a, b) of the Beta distribution with this mean and a + b = concentration."""
    if not 0.0 < mean < 1.0 or concentration <= 0:
        raise ValueError(f"mean={mean} must be in (0, 1) and concentration={concentration} positive")
    return mean * concentration, (1.0 - mean) * concentration


def min_mask_ratio(size: int) -> float:
    """Return the token ratio of the smallest brush: one token, grown by the dilation."""
    side = math.ceil(size / PATCH_PX)
    return min(1.0, (1 + 2 * DILATION_TOKENS) ** 2 / side**2)


def draw_mask_ratios(
    rng: np.random.Generator, count: int, *, mean: float, concentration: float, low: float, high: float
) -> np.ndarray:
    """Draw `count` ratios from Beta(mean, concentration), stratified, in random order, clipped to [low, high].

    Ratio i is the distribution's quantile at (i + 0.5) / count, estimated from a large sample, so that a
    trace of a few dozen requests already has about the distribution's mean and spread. The lower clip is the
    smallest brush. For the 0.11 set it raises the mean by about 0.0005 at 384 px and 0.003 at 256 px.
    """
    a, b = beta_parameters(mean, concentration)
    pool = rng.beta(a, b, size=STRATIFIED_POOL)
    quantiles = np.quantile(pool, (np.arange(count) + 0.5) / count)
    return rng.permutation(np.clip(quantiles, low, high))


def unit_arrivals(rng: np.random.Generator, count: int) -> np.ndarray:
    """Return arrival times of a Poisson process from 0, scaled so the mean gap is exactly 1.

    Given how many arrivals fall in a span, a Poisson process places them like sorted uniform draws, so the
    scaling keeps the process's shape while the offered rate of a short trace equals the nominal rate.
    """
    gaps = rng.exponential(1.0, size=count)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return arrivals * (count - 1) / arrivals[-1] if count > 1 else arrivals


def make_trace(config: BenchConfig, mask_mean: float, count: int) -> list[TraceRequest]:
    """Build the seeded request sequence of one mask set, which every system replays at every rate."""
    rng = np.random.default_rng([config.seed, round(mask_mean * 1000)])
    arrivals = unit_arrivals(rng, count)
    templates = rng.choice(config.templates, size=count, p=zipf_weights(config.templates, config.zipf_exponent))
    ratios = draw_mask_ratios(
        rng, count, mean=mask_mean, concentration=config.beta_concentration, low=min_mask_ratio(config.size),
        high=MAX_MASK_RATIO,
    )
    centers = rng.uniform(0.3, 0.7, size=(count, 2))
    aspects = np.exp(rng.uniform(math.log(0.7), math.log(1.4), size=count))
    prompts = rng.integers(0, len(PROMPTS), size=count)
    return [
        TraceRequest(
            index=index, unit_arrival_s=float(arrivals[index]), template=int(templates[index]),
            mask_ratio=float(ratios[index]), center=(float(centers[index, 0]), float(centers[index, 1])),
            aspect=float(aspects[index]), prompt=PROMPTS[int(prompts[index])],
        )
        for index in range(count)
    ]


def brush_mask(target_ratio: float, size: int, *, center: tuple[float, float], aspect: float) -> np.ndarray:
    """Return an elliptical brush mask whose dilated token mask covers about `target_ratio` of the tokens.

    The token ratio grows with the radius for a fixed center, so a bisection on the radius finds it.
    """
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    center_row, center_col = center[0] * size, center[1] * size

    def ellipse(radius: float) -> np.ndarray:
        return ((rows - center_row) / (aspect * radius)) ** 2 + ((cols - center_col) / radius) ** 2 <= 1.0

    def ratio(radius: float) -> float:
        return mask_ratio(ellipse(radius), patch=PATCH_PX, dilation=DILATION_TOKENS)

    low, high = 0.5, 2.0 * size
    for _ in range(24):
        middle = (low + high) / 2
        if ratio(middle) < target_ratio:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda radius: abs(ratio(radius) - target_ratio))
    mask = ellipse(best)
    if not mask.any():
        # A brush smaller than a pixel: paint the center pixel, the smallest mask the API accepts.
        mask[min(size - 1, int(center_row)), min(size - 1, int(center_col))] = True
    return mask


def request_mask_png(request: TraceRequest, size: int) -> bytes:
    mask = brush_mask(request.mask_ratio, size, center=request.center, aspect=request.aspect)
    return png(mask.astype(np.uint8) * 255)


def template_images(count: int, size: int) -> list[np.ndarray]:
    """Return `count` distinct size x size RGB templates: the demo photos, center-cropped, then their mirror images."""
    photos = sorted(path for path in PHOTOS.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no photos in {PHOTOS}")
    if count > 2 * len(photos):
        raise ValueError(f"templates={count} exceeds the {2 * len(photos)} that {len(photos)} photos give")
    images = []
    for index in range(count):
        with Image.open(photos[index % len(photos)]) as photo:
            image = ImageOps.fit(photo.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        if index >= len(photos):
            image = ImageOps.mirror(image)
        images.append(np.asarray(image, dtype=np.uint8))
    return images


# --- Metrics --------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One submitted request as the client saw it. Times are seconds since the epoch."""

    submitted_at: float
    status: str  # a final job status, "unfinished" or "rejected"
    finished_at: float | None = None
    started_at: float | None = None
    cache_outcome: str | None = None
    mask_ratio: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunMetrics:
    submitted: int
    completed: int
    offered_rps: float
    throughput_rps: float
    mean_latency_s: float
    p95_latency_s: float
    mean_queue_s: float
    kept_up: bool
    cache_hit_share: float
    cache_outcomes: dict[str, int]
    mean_mask_ratio: float
    phase_ms: dict[str, float]


def summarize_run(completions: Sequence[Completion]) -> RunMetrics:
    """Compute throughput, latency and keep-up of one rate's run, with NaN where no job completed."""
    done = [c for c in completions if c.status == "succeeded" and c.finished_at is not None]
    submits = [c.submitted_at for c in completions]
    span = max(submits) - min(submits) if len(submits) > 1 else 0.0
    offered = (len(submits) - 1) / span if span > 0 else float("nan")

    if not done:
        nan = float("nan")
        return RunMetrics(
            submitted=len(completions), completed=0, offered_rps=offered, throughput_rps=0.0, mean_latency_s=nan,
            p95_latency_s=nan, mean_queue_s=nan, kept_up=False, cache_hit_share=nan, cache_outcomes={},
            mean_mask_ratio=nan, phase_ms={},
        )

    latencies = np.array([c.finished_at - c.submitted_at for c in done])
    window = max(c.finished_at for c in done) - min(submits)
    throughput = len(done) / window if window > 0 else float("nan")
    queue = [c.started_at - c.submitted_at for c in done if c.started_at is not None]
    phases = sorted({phase for c in done for phase in c.timings_ms})
    kept_up = len(done) == len(completions) and (math.isnan(offered) or throughput >= KEEP_UP_FRACTION * offered)
    return RunMetrics(
        submitted=len(completions),
        completed=len(done),
        offered_rps=offered,
        throughput_rps=throughput,
        mean_latency_s=float(latencies.mean()),
        p95_latency_s=float(np.percentile(latencies, 95)),
        mean_queue_s=float(np.mean(queue)) if queue else float("nan"),
        kept_up=kept_up,
        cache_hit_share=sum(c.cache_outcome == "hit" for c in done) / len(done),
        cache_outcomes=dict(Counter(str(c.cache_outcome) for c in done)),
        mean_mask_ratio=float(np.mean([c.mask_ratio for c in done if c.mask_ratio is not None] or [math.nan])),
        phase_ms={phase: float(np.mean([c.timings_ms.get(phase, 0.0) for c in done])) for phase in phases},
    )


@dataclass(frozen=True)
class Row:
    """One system at one rate and mask set: the report's unit."""

    system: str
    mask_mean: float
    rate_multiple: float
    rate_rps: float
    offered_rps: float
    throughput_rps: float
    mean_latency_s: float
    p95_latency_s: float
    mean_queue_s: float
    submitted: int
    completed: int
    kept_up: bool
    cache_hit_share: float
    cache_outcomes: dict[str, int]
    mean_mask_ratio: float
    phase_ms: dict[str, float]


def make_row(system: str, mask_mean: float, multiple: float, rate_rps: float, metrics: RunMetrics) -> Row:
    return Row(
        system=system, mask_mean=mask_mean, rate_multiple=multiple, rate_rps=round(rate_rps, 4),
        offered_rps=round(metrics.offered_rps, 4), throughput_rps=round(metrics.throughput_rps, 4),
        mean_latency_s=round(metrics.mean_latency_s, 3), p95_latency_s=round(metrics.p95_latency_s, 3),
        mean_queue_s=round(metrics.mean_queue_s, 3), submitted=metrics.submitted, completed=metrics.completed,
        kept_up=metrics.kept_up, cache_hit_share=round(metrics.cache_hit_share, 3),
        cache_outcomes=dict(sorted(metrics.cache_outcomes.items())),
        mean_mask_ratio=round(metrics.mean_mask_ratio, 4),
        phase_ms={phase: round(ms, 1) for phase, ms in metrics.phase_ms.items()},
    )


@dataclass(frozen=True)
class Headline:
    """The full system against the baseline for one mask set."""

    mask_mean: float
    compared_rate_rps: float | None  # highest rate the baseline kept up, or None when it kept up at none
    baseline_latency_s: float
    full_latency_s: float
    latency_ratio: float
    baseline_max_throughput_rps: float
    full_max_throughput_rps: float
    throughput_ratio: float


LATENCY_TARGET = 10.0
THROUGHPUT_TARGET = 3.0


def max_throughput(rows: Sequence[Row]) -> float:
    """Return the highest throughput over the rates at which every submitted job completed (NaN if none did)."""
    values = [row.throughput_rps for row in rows if row.completed == row.submitted and row.completed > 0]
    return max(values) if values else float("nan")


def headline(rows: Sequence[Row], mask_mean: float) -> Headline:
    """Compare mean latency at the highest rate the baseline kept up, and max throughput."""
    base = sorted((r for r in rows if r.system == BASELINE and r.mask_mean == mask_mean), key=lambda r: r.rate_rps)
    full = {r.rate_multiple: r for r in rows if r.system == FULL_SYSTEM and r.mask_mean == mask_mean}
    if not base or not full:
        raise ValueError(f"mask mean {mask_mean}: the report needs rows of both {BASELINE} and {FULL_SYSTEM}")
    sustained = [r for r in base if r.kept_up and r.rate_multiple in full]
    compared = sustained[-1] if sustained else base[0]
    other = full[compared.rate_multiple]
    base_max, full_max = max_throughput(base), max_throughput(list(full.values()))
    # Where the baseline kept up at every rate, no rate reached its capacity, so the ratio is not measured.
    throughput_ratio = float("nan") if all(r.kept_up for r in base) else round(full_max / base_max, 2)
    return Headline(
        mask_mean=mask_mean,
        compared_rate_rps=compared.rate_rps if sustained else None,
        baseline_latency_s=compared.mean_latency_s,
        full_latency_s=other.mean_latency_s,
        latency_ratio=round(compared.mean_latency_s / other.mean_latency_s, 2),
        baseline_max_throughput_rps=base_max,
        full_max_throughput_rps=full_max,
        throughput_ratio=throughput_ratio,
    )


# --- Stack ----------------------------------------------------------------------------------------------


@dataclass
class ServingStack:
    """A stack started for one system."""

    system: System
    url: str
    token: str
    env: dict[str, str]
    redis_url: str
    run_dir: Path
    group: ProcessGroup


def stack_env(system: System, run_dir: Path, model: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        {
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SECURE_SSL_REDIRECT": "0",  # plain HTTP on loopback
            "DATABASE_URL": f"sqlite:///{run_dir / 'db.sqlite3'}",
            "EDITOR_VAR_DIR": str(run_dir),
            "EDITOR_MEDIA_ROOT": str(run_dir / "media"),
            "EDITOR_MODEL": str(model),
            # Warm-ups are requested explicitly with the trace's seed, steps and guidance.
            "EDITOR_WARMUP_ON_CREATE": "0",
            "EDITOR_JOB_SUBMIT_RATE": "1000/s",
            "LOG_LEVEL": "WARNING",
            # Two worker processes share the CPU cores: one thread each.
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(system.env)
    return env


def start_logged(
    group: ProcessGroup, name: str, args: list[str], env: dict[str, str], log_dir: Path,
    leader_signal: int | None = None,
) -> subprocess.Popen:
    """Start a child in its own session (so the group can stop it) with its output in `log_dir/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name.replace(' ', '-')}.log", "ab") as log:
        process = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    group.adopt(name, process, leader_signal=leader_signal)
    return process


def start_worker(stack: ServingStack, name: str) -> None:
    """Start a worker on every queue, with its own disk cache folder as on separate machines.

    The batch size comes from the system, not from this process's settings, so the pool matches the engine.
    """
    from editing.routing import all_queues

    env = {**stack.env, "EDITOR_CACHE_DIR": str(stack.run_dir / f"cache-{name}")}
    command = worker_command(all_queues(), name=name, batch=int(stack.system.env["EDITOR_ENGINE_MAX_BATCH"]))
    start_logged(
        stack.group, f"worker {name}", command, env, stack.run_dir / "logs", leader_signal=CELERY_COLD_SHUTDOWN
    )


def start_serving_stack(system: System, run_dir: Path, model: Path) -> ServingStack:
    """Start Redis, the workers, the reconciler and gunicorn for `system`, with one API user."""
    env = stack_env(system, run_dir, model)
    group = ProcessGroup()
    try:
        redis_process, redis_url = start_embedded_redis(run_dir)
        group.adopt("embedded redis", redis_process, stop_last=True)
        env["REDIS_URL"] = redis_url
        manage(["migrate", "--noinput"], env)
        tokens = manage(["shell", "--verbosity", "0", "-c", CREATE_USERS.format(count=1)], env).split()
        if len(tokens) != 1:
            raise RuntimeError(f"expected one API token from manage.py shell; got {tokens[:5]}")
        port = free_loopback_port()
        stack = ServingStack(system, f"http://127.0.0.1:{port}", tokens[0], env, redis_url, run_dir, group)
        for name in WORKER_NAMES:
            start_worker(stack, name)
        logs = run_dir / "logs"
        reconciler = [sys.executable, "manage.py", "reconcile_jobs", "--interval", "10"]
        start_logged(group, "reconciler", reconciler, env, logs)
        web = start_logged(
            group, "gunicorn",
            [
                sys.executable, "-m", "gunicorn", "editor_site.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2",
                "--worker-class", "gthread", "--threads", "8", "--timeout", "120", "--log-level", "warning",
            ],
            env, logs,
        )
        wait_for_port(port, timeout_s=STARTUP_TIMEOUT_S, process=web)
    except BaseException:
        group.stop()
        raise
    return stack


def live_workers(stack: ServingStack) -> int:
    """Count the workers whose heartbeat is in the stack's Redis. A worker publishes it once it consumes."""
    import redis

    from editor_site.redis_keys import worker_state_pattern

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)
    try:
        return len(client.keys(worker_state_pattern()))
    finally:
        client.close()


def wait_for_workers(stack: ServingStack, count: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while live_workers(stack) < count:
        exited = stack.group.first_exited()
        if exited is not None:
            raise RuntimeError(f"{exited[0]} exited with code {exited[1]}; see {stack.run_dir / 'logs'}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers did not come up within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def workers_with_model(stack: ServingStack) -> set[str]:
    """Return the workers that ran a job or a warm-up, which loads the model."""
    script = (
        "from editing.models import CacheWarmup, EditJob; "
        "names = set(EditJob.objects.exclude(worker='').values_list('worker', flat=True)); "
        "names |= set(CacheWarmup.objects.exclude(worker='').values_list('worker', flat=True)); "
        "print(','.join(sorted(names)))"
    )
    lines = manage(["shell", "--verbosity", "0", "-c", script], stack.env).strip().splitlines()
    return {name for name in (lines[-1] if lines else "").split(",") if name}


# --- API client -----------------------------------------------------------------------------------------


def parse_time(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


class ApiClient:
    """Token-authenticated calls of the service API, with one HTTP session per thread."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Token {self.token}"
            self._local.session = session
        return session

    def upload_template(self, image: np.ndarray, name: str) -> int:
        response = self.session.post(
            f"{self.url}/api/templates/", data={"name": name}, files={"image": (f"{name}.png", png(image))},
            timeout=REQUEST_TIMEOUT_S,
        )
        response.raise_for_status()
        return int(response.json()["id"])

    def warm(self, template_id: int, *, seed: int, steps: int, guidance: float, every_worker: bool) -> None:
        action = "warm-all" if every_worker else "warm"
        response = self.session.post(
            f"{self.url}/api/templates/{template_id}/{action}/",
            json={"seed": seed, "steps": steps, "guidance": guidance}, timeout=REQUEST_TIMEOUT_S,
        )
        response.raise_for_status()

    def warmup_statuses(self, template_id: int) -> list[str]:
        response = self.session.get(f"{self.url}/api/templates/{template_id}/warmups/", timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return [row["status"] for row in response.json()]

    def submit(self, template_id: int, mask_png: bytes, prompt: str, *, seed: int, steps: int, guidance: float) -> str:
        response = self.session.post(
            f"{self.url}/api/jobs/",
            data={"template": template_id, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance},
            files={"mask": ("mask.png", mask_png)}, timeout=REQUEST_TIMEOUT_S,
        )
        if response.status_code != 201:
            raise RuntimeError(f"job submission failed with HTTP {response.status_code}: {response.text[:300]}")
        return str(response.json()["id"])

    def recent_jobs(self, limit: int) -> list[dict]:
        """Return the user's `limit` newest jobs (the API lists newest first)."""
        response = self.session.get(f"{self.url}/api/jobs/", params={"limit": limit}, timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return response.json()["results"]

    def cancel(self, job_id: str) -> None:
        self.session.post(f"{self.url}/api/jobs/{job_id}/cancel/", timeout=REQUEST_TIMEOUT_S)


# --- Replay ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobParams:
    seed: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class PreparedRequest:
    """A trace request with its upload-ready mask and its submission offset at one rate."""

    offset_s: float
    template_id: int
    mask_png: bytes
    prompt: str


def completion_from(job: dict, submitted_at: float) -> Completion:
    return Completion(
        submitted_at=submitted_at, status=job["status"], finished_at=parse_time(job.get("finished_at")),
        started_at=parse_time(job.get("started_at")), cache_outcome=job.get("cache_outcome"),
        mask_ratio=job.get("mask_ratio"), timings_ms=dict(job.get("timings") or {}),
    )


class JobTracker:
    """The jobs one replay submitted, with submission times, and the final states the API reported."""

    def __init__(self, client: ApiClient, params: JobParams) -> None:
        self.client = client
        self.params = params
        self.submitted: dict[str, float] = {}
        self.rejected: list[float] = []
        self.final: dict[str, dict] = {}
        self._lock = threading.Lock()

    def submit(self, request: PreparedRequest) -> None:
        """Submit one request from a submission thread. A failed submission is recorded as rejected."""
        at = time.time()
        try:
            job_id = self.client.submit(request.template_id, request.mask_png, request.prompt, seed=self.params.seed,
                                        steps=self.params.steps, guidance=self.params.guidance)
        except (requests.RequestException, RuntimeError) as error:
            logger.warning("submission failed: %s", error)
            with self._lock:
                self.rejected.append(at)
            return
        with self._lock:
            self.submitted[job_id] = at

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return [job_id for job_id in self.submitted if job_id not in self.final]

    def poll(self) -> None:
        """Record the jobs that are final now. Call it after every submission has returned."""
        try:
            jobs = self.client.recent_jobs(len(self.submitted))
        except requests.RequestException as error:
            logger.warning("polling failed: %s", error)
            return
        with self._lock:
            for job in jobs:
                if job["id"] in self.submitted and job["status"] in FINAL_STATUSES:
                    self.final[job["id"]] = job

    def cancel_pending(self) -> None:
        """Cancel the unfinished jobs and wait until they stop, so the next run starts on idle workers.

        They stay out of `final`, so they count as unfinished.
        """
        pending = self.pending
        logger.warning("cancelling %d jobs left after the drain timeout", len(pending))
        for job_id in pending:
            try:
                self.client.cancel(job_id)
            except requests.RequestException as error:
                logger.warning("cancelling job %s failed: %s", job_id, error)
        stopped: set[str] = set()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while len(stopped) < len(pending) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
            for job in self.client.recent_jobs(len(self.submitted)):
                if job["id"] in pending and job["status"] in FINAL_STATUSES:
                    stopped.add(job["id"])
        if len(stopped) < len(pending):
            left = len(pending) - len(stopped)
            raise TimeoutError(f"{left} cancelled jobs did not stop within {CANCEL_WAIT_S:.0f} s")

    def completions(self) -> list[Completion]:
        finished = [
            completion_from(self.final[job_id], at) if job_id in self.final
            else Completion(submitted_at=at, status="unfinished")
            for job_id, at in self.submitted.items()
        ]
        return finished + [Completion(submitted_at=at, status="rejected") for at in self.rejected]


def replay(
    client: ApiClient, requests_: Sequence[PreparedRequest], params: JobParams, *, drain_timeout_s: float
) -> list[Completion]:
    """Submit each request at its offset, then poll until every job is final or `drain_timeout_s` has passed.

    Jobs still unfinished at the timeout are cancelled. Submissions run on threads, so a slow response
    delays no later arrival.
    """
    tracker = JobTracker(client, params)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=SUBMIT_THREADS) as pool:
        futures = []
        for request in requests_:
            time.sleep(max(0.0, start + request.offset_s - time.monotonic()))
            futures.append(pool.submit(tracker.submit, request))
        for future in futures:
            future.result()
    # Latency comes from the jobs' own finish times, so polling only after the last submission loses nothing.
    deadline = time.monotonic() + drain_timeout_s
    while True:
        tracker.poll()
        if not tracker.pending or time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    if tracker.pending:
        tracker.cancel_pending()
    return tracker.completions()


def prepare_requests(
    trace: Sequence[TraceRequest], rate_rps: float, template_ids: Sequence[int], masks: dict[int, bytes]
) -> list[PreparedRequest]:
    return [
        PreparedRequest(request.unit_arrival_s / rate_rps, template_ids[request.template], masks[request.index],
                        request.prompt)
        for request in trace
    ]


# --- One system -----------------------------------------------------------------------------------------


def prepare_stack(stack: ServingStack, client: ApiClient, images: list[np.ndarray], params: JobParams,
                  priming_png: bytes, warm_on: str) -> tuple[list[int], set[str]]:
    """Upload and warm the templates, then run untimed jobs until each worker has loaded its model.

    Return the template ids and the workers that loaded their model before the trace.
    """
    wait_for_workers(stack, len(WORKER_NAMES))
    template_ids = [client.upload_template(image, f"template-{index}") for index, image in enumerate(images)]
    if stack.system.cache_enabled:
        for template_id in template_ids:
            client.warm(template_id, seed=params.seed, steps=params.steps, guidance=params.guidance,
                        every_worker=warm_on == "every")
        wait_for_warmups(stack, client, template_ids)
    return template_ids, prime_workers(stack, client, template_ids, priming_png, params)


def wait_for_warmups(stack: ServingStack, client: ApiClient, template_ids: Sequence[int]) -> None:
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    pending = set(template_ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-ups of templates {sorted(pending)} did not finish in {WARMUP_TIMEOUT_S:.0f} s")
        for template_id in sorted(pending):
            statuses = client.warmup_statuses(template_id)
            ended = [status for status in statuses if status in ("failed", "cancelled")]
            if ended:
                raise RuntimeError(f"a warm-up of template {template_id} ended {ended[0]}; see {stack.run_dir}")
            if statuses and all(status == "succeeded" for status in statuses):
                pending.discard(template_id)
        time.sleep(POLL_INTERVAL_S)


def prime_workers(
    stack: ServingStack, client: ApiClient, template_ids: Sequence[int], mask_png: bytes, params: JobParams
) -> set[str]:
    """Run rounds of untimed jobs until every worker has run a job or warm-up, so model loading is not timed.

    A round has a job per template and at least one more job than all batch slots together, because cost
    routing sends a template's jobs to the worker that has its cache, and a batching worker takes several.
    Return the workers that ran one. When some never did, a warning names them and the trace runs anyway.
    """
    slots = len(WORKER_NAMES) * int(stack.system.env["EDITOR_ENGINE_MAX_BATCH"]) + 1
    count = max(len(template_ids), slots)
    loaded: set[str] = set()
    for _ in range(PRIMING_ROUNDS):
        batch = [PreparedRequest(0.0, template_ids[index % len(template_ids)], mask_png, "warm")
                 for index in range(count)]
        completions = replay(client, batch, params, drain_timeout_s=STARTUP_TIMEOUT_S + WARMUP_TIMEOUT_S)
        if any(c.status != "succeeded" for c in completions):
            raise RuntimeError(f"an untimed job did not succeed: {[c.status for c in completions]}")
        # Celery names a worker `<name>@<host>`.
        loaded = {worker.split("@")[0] for worker in workers_with_model(stack)}
        if set(WORKER_NAMES) <= loaded:
            return loaded
    logger.warning(
        "%s: workers %s ran no untimed job in %d rounds, so their model loads during the trace",
        stack.system.name, sorted(set(WORKER_NAMES) - loaded), PRIMING_ROUNDS,
    )
    return loaded


def calibrate(client: ApiClient, config: BenchConfig, template_ids: Sequence[int], params: JobParams) -> float:
    """Measure capacity in jobs per second: a burst of trace requests submitted at once, completed / elapsed."""
    trace = make_trace(config, config.mask_means[0], config.calibration_jobs)
    masks = {request.index: request_mask_png(request, config.size) for request in trace}
    burst = [PreparedRequest(0.0, template_ids[r.template], masks[r.index], r.prompt) for r in trace]
    metrics = summarize_run(replay(client, burst, params, drain_timeout_s=WARMUP_TIMEOUT_S))
    if metrics.completed != metrics.submitted or not metrics.throughput_rps > 0:
        raise RuntimeError(f"calibration completed {metrics.completed} of {metrics.submitted} jobs")
    return metrics.throughput_rps


def drain_timeout(config: BenchConfig, capacity_rps: float) -> float:
    """Return a drain time long enough for the baseline to finish a full backlog of one rate's requests."""
    return 30.0 + 1.5 * config.requests_per_rate / capacity_rps


@dataclass(frozen=True)
class SystemRun:
    """The rows of one system, the capacity its rates were multiples of, and the workers loaded before the trace."""

    rows: list[Row]
    capacity_rps: float
    loaded_workers: set[str]


def run_system(
    system: System, config: BenchConfig, run_root: Path, model: Path, capacity_rps: float | None,
    traces: dict[float, list[TraceRequest]], masks: dict[float, dict[int, bytes]],
) -> SystemRun:
    """Start a stack for `system` and replay every mask set at every rate.

    Without `capacity_rps` the capacity is measured first, on this system.
    """
    params = JobParams(config.seed, config.steps, config.guidance)
    run_dir = run_root / system.name
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("%s: starting the stack in %s", system.name, run_dir)
    stack = start_serving_stack(system, run_dir, model)
    rows: list[Row] = []
    try:
        client = ApiClient(stack.url, stack.token)
        priming_png = next(iter(masks[config.mask_means[0]].values()))
        images = template_images(config.templates, config.size)
        template_ids, loaded = prepare_stack(stack, client, images, params, priming_png, config.warm_on)
        if capacity_rps is None:
            capacity_rps = calibrate(client, config, template_ids, params)
            logger.info("%s capacity: %.3f jobs/s", system.name, capacity_rps)
        for mask_mean in config.mask_means:
            for multiple in config.rate_multiples:
                rate = multiple * capacity_rps
                requests_ = prepare_requests(traces[mask_mean], rate, template_ids, masks[mask_mean])
                metrics = summarize_run(replay(client, requests_, params,
                                               drain_timeout_s=drain_timeout(config, capacity_rps)))
                row = make_row(system.name, mask_mean, multiple, rate, metrics)
                logger.info("%s", row)
                rows.append(row)
        return SystemRun(rows, capacity_rps, loaded)
    finally:
        stack.group.stop()


# --- Whole run and report -------------------------------------------------------------------------------


def environment(config: BenchConfig, runs: dict[str, SystemRun], started: float, load_start: float) -> dict:
    capacity_rps = runs[BASELINE].capacity_rps
    return {
        "command": " ".join(["python -m bench.serving", *sys.argv[1:]]),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "diffusers": metadata.version("diffusers"),
        "model": f"Flux Fill demo architecture, preset '{config.preset}' (workers/demo_model.py), "
                 "seeded random weights",
        "working_size": f"{config.size}x{config.size}",
        "steps": config.steps,
        "guidance": config.guidance,
        "seed": config.seed,
        "templates": f"{config.templates} from demo/photos (center-cropped, then mirrored copies)",
        "templates_warmed_on": "every worker" if config.warm_on == "every" else "one worker each",
        "template_popularity": f"Zipf, exponent {config.zipf_exponent}",
        "mask_ratio_distribution": f"Beta with the set's mean, a + b = {config.beta_concentration}, stratified "
                                   f"quantiles clipped to [{min_mask_ratio(config.size):.3f}, {MAX_MASK_RATIO}]",
        "requests_per_rate": config.requests_per_rate,
        "rate_multiples": list(config.rate_multiples),
        "baseline_capacity_rps": round(capacity_rps, 4),
        "calibration_jobs": config.calibration_jobs,
        "drain_timeout_s": round(drain_timeout(config, capacity_rps), 1),
        "keep_up_rule": f"every job completed and throughput >= {KEEP_UP_FRACTION} x offered rate",
        "stack": "gunicorn 2 processes x 8 threads, 2 Celery worker processes (OMP_NUM_THREADS=1, every queue "
                 "each, own cache folder each; prefork with one child at batch 1, else one job thread per batch "
                 "slot sharing the engine), reconciler, embedded Redis, SQLite; client on the same machine",
        "systems": {system.name: system.env for system in SYSTEMS if system.name in config.systems},
        "workers_loaded_before_trace": {name: sorted(run.loaded_workers) for name, run in runs.items()},
        "load_average_at_start": round(load_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "duration_s": round(time.time() - started, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_benchmark(config: BenchConfig, *, keep: bool) -> tuple[list[Row], dict]:
    from workers.demo_model import ensure_demo_model

    started, load_start = time.time(), os.getloadavg()[0]
    model = ensure_demo_model(ROOT / "var" / "models", config.preset)
    traces = {mean: make_trace(config, mean, config.requests_per_rate) for mean in config.mask_means}
    masks = {mean: {r.index: request_mask_png(r, config.size) for r in trace} for mean, trace in traces.items()}
    run_root = ROOT / "var" / "bench" / f"serving-{int(started)}"
    systems = [system for system in SYSTEMS if system.name in config.systems]
    if systems[0].name != BASELINE:
        raise ValueError(f"the first system must be {BASELINE}: it sets the rates")
    runs: dict[str, SystemRun] = {}
    capacity: float | None = None
    # A failed run leaves its folder (databases, process logs) for inspection.
    for system in systems:
        runs[system.name] = run_system(system, config, run_root, model, capacity, traces, masks)
        capacity = runs[system.name].capacity_rps
    if not keep:
        shutil.rmtree(run_root, ignore_errors=True)
    rows = [row for run in runs.values() for row in run.rows]
    return rows, environment(config, runs, started, load_start)


def without_nan(record: dict) -> dict:
    """NaN (no job completed) becomes null, since JSON has no NaN."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in record.items()}


def throughput_verdict(ratio: float) -> str:
    if math.isnan(ratio):
        return "not measured (the baseline kept up at every rate)"
    return f"{ratio:.2f}x ({'met' if ratio >= THROUGHPUT_TARGET else 'not met'})"


def format_number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_report(rows: Sequence[Row], env: dict, out_dir: Path) -> list[Headline]:
    """Write serving.json (the rows), serving.environment.json, serving.md and serving.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps([without_nan(asdict(row)) for row in rows], indent=2) + "\n")
    (out_dir / "serving.environment.json").write_text(json.dumps(env, indent=2) + "\n")
    mask_means = sorted({row.mask_mean for row in rows})
    headlines = [headline(rows, mean) for mean in mask_means]
    (out_dir / "serving.md").write_text(markdown(rows, env, headlines))
    write_plot(rows, out_dir / "serving.png")
    return headlines


def markdown(rows: Sequence[Row], env: dict, headlines: Sequence[Headline]) -> str:
    systems = list(dict.fromkeys(row.system for row in rows))
    lines = [
        "# Serving benchmark: request traces through the whole stack",
        "",
        f"Generated by `{env['command']}`. A seeded trace of edit requests (Poisson arrivals, Zipf template "
        "popularity, brush-ellipse masks with Beta-distributed token ratios) is replayed through the API of a "
        "fresh stack per system, at rates that are multiples of the baseline's capacity (measured by a burst of "
        f"{env['calibration_jobs']} jobs on the baseline stack). Every system and rate replays the same "
        f"{env['requests_per_rate']} requests per mask set, with arrival gaps scaled to the rate. Before the "
        "timed trace the templates are uploaded and warmed (cache systems; "
        f"on {env.get('templates_warmed_on', 'one worker each')}) and each worker completes one untimed "
        "job, so model loading is not timed.",
        "",
        "Latency: the job's `finished_at` minus the client's clock at submission. Throughput: completed jobs / "
        "(last finish - first submission). Offered: (submitted - 1) / submission span. "
        f"Kept up: {env['keep_up_rule']}. Jobs left when the drain timeout "
        f"({env['drain_timeout_s']} s after the last submission) ends are cancelled and count as not completed. "
        "The model has random weights, so the fills are not meaningful images; the compute is that of the "
        "architecture.",
        "",
        "| system | settings |",
        "|---|---|",
        *[f"| {name} | {' '.join(f'{k}={v}' for k, v in env['systems'][name].items())} |" for name in systems],
        "",
        "## Headline: full system (`routed`) against `baseline`",
        "",
        "| mask mean | compared at (rps) | baseline mean latency (s) | routed mean latency (s) | latency ratio "
        f"(target {LATENCY_TARGET:g}x) | max throughput baseline / routed (rps) | throughput ratio "
        f"(target {THROUGHPUT_TARGET:g}x) |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in headlines:
        compared = (format_number(item.compared_rate_rps, 3) if item.compared_rate_rps is not None
                    else "lowest rate (baseline kept up at none)")
        lines.append(
            f"| {item.mask_mean:g} | {compared} | {format_number(item.baseline_latency_s)} | "
            f"{format_number(item.full_latency_s)} | {format_number(item.latency_ratio)}x "
            f"({'met' if item.latency_ratio >= LATENCY_TARGET else 'not met'}) | "
            f"{format_number(item.baseline_max_throughput_rps, 3)} / "
            f"{format_number(item.full_max_throughput_rps, 3)} | "
            f"{throughput_verdict(item.throughput_ratio)} |"
        )
    lines += [
        "",
        "The latency ratio is taken at the highest rate the baseline kept up. Max throughput is the highest "
        "throughput over the rates at which every submitted job completed.",
        "",
    ]
    for mean in sorted({row.mask_mean for row in rows}):
        lines += [
            f"## Mask ratio mean {mean:g}",
            "",
            "| system | rate x capacity | rate (rps) | offered (rps) | throughput (rps) | mean latency (s) "
            "| P95 latency (s) | mean queue wait (s) | completed / submitted | kept up | cache hits "
            "| mean mask ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row.mask_mean != mean:
                continue
            lines.append(
                f"| {row.system} | {row.rate_multiple:g} | {row.rate_rps:.3f} | {format_number(row.offered_rps, 3)} | "
                f"{format_number(row.throughput_rps, 3)} | {format_number(row.mean_latency_s)} | "
                f"{format_number(row.p95_latency_s)} | {format_number(row.mean_queue_s)} | "
                f"{row.completed} / {row.submitted} | {'yes' if row.kept_up else 'no'} | "
                f"{format_number(row.cache_hit_share * 100, 0)}% | {format_number(row.mean_mask_ratio, 3)} |"
            )
        lines.append("")
    lines += [
        "Mean time per job phase (ms, from the job's `timings`) is in `serving.json` (`phase_ms`).",
        "",
        "## Environment",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in env.items() if key != "systems"],
        "",
        "![Latency and throughput against the offered rate](serving.png)",
        "",
    ]
    return "\n".join(lines)


def write_plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    means = sorted({row.mask_mean for row in rows})
    figure, axes = plt.subplots(len(means), 2, figsize=(11, 4 * len(means)), squeeze=False)
    for line, mean in enumerate(means):
        latency_axis, throughput_axis = axes[line]
        for system in dict.fromkeys(row.system for row in rows):
            points = sorted((r for r in rows if r.system == system and r.mask_mean == mean), key=lambda r: r.rate_rps)
            rates = [r.rate_rps for r in points]
            (plotted,) = latency_axis.plot(rates, [r.mean_latency_s for r in points], marker="o", label=system)
            throughput_axis.plot(rates, [r.throughput_rps for r in points], marker="o", color=plotted.get_color(),
                                 label=system)
            missed = [r for r in points if not r.kept_up]
            latency_axis.scatter([r.rate_rps for r in missed], [r.mean_latency_s for r in missed], s=90,
                                 facecolors="none", edgecolors="black", zorder=3)
        offered = sorted({r.rate_rps for r in rows if r.mask_mean == mean})
        throughput_axis.plot(offered, offered, linestyle=":", color="gray", label="offered rate")
        latency_axis.set(xscale="log", yscale="log", xlabel="arrival rate (requests/s)", ylabel="mean latency (s)",
                         title=f"mask mean {mean:g}: mean latency (circled: not kept up)")
        throughput_axis.set(xscale="log", xlabel="arrival rate (requests/s)", ylabel="throughput (jobs/s)",
                            title=f"mask mean {mean:g}: throughput")
        for axis in (latency_axis, throughput_axis):
            axis.xaxis.set_major_formatter(plain)
            axis.xaxis.set_minor_formatter(plain)
            axis.legend()
        latency_axis.yaxis.set_major_formatter(plain)
        latency_axis.yaxis.set_minor_formatter(plain)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def customized(config: BenchConfig, args: argparse.Namespace) -> BenchConfig:
    """Apply the command-line options to `config`; exit with a message naming a bad value."""
    changes: dict[str, object] = {}
    if args.requests is not None:
        if args.requests < 2:
            raise SystemExit(f"--requests {args.requests} is too small; pass 2 or more.")
        changes["requests_per_rate"] = args.requests
    if args.rates:
        try:
            rates = tuple(float(part) for part in args.rates.split(","))
        except ValueError:
            raise SystemExit(f"--rates {args.rates!r} must be comma-separated numbers such as 0.9,3") from None
        if not rates or min(rates) <= 0:
            raise SystemExit(f"--rates {args.rates!r} must be positive multiples of the baseline capacity.")
        changes["rate_multiples"] = rates
    if args.mask_means:
        try:
            means = tuple(float(part) for part in args.mask_means.split(","))
        except ValueError:
            raise SystemExit(
                f"--mask-means {args.mask_means!r} is invalid. Pass comma-separated numbers such as 0.11,0.19."
            ) from None
        if not all(0 < mean < MAX_MASK_RATIO for mean in means):
            raise SystemExit(
                f"--mask-means {args.mask_means!r} is invalid. Pass means above 0 and below {MAX_MASK_RATIO}."
            )
        changes["mask_means"] = means
    if args.systems:
        names = tuple(part.strip() for part in args.systems.split(",") if part.strip())
        known = {system.name for system in SYSTEMS}
        unknown = sorted(set(names) - known)
        if unknown or BASELINE not in names:
            raise SystemExit(f"--systems {args.systems!r}: use names from {sorted(known)}, including {BASELINE!r}.")
        changes["systems"] = names
    if args.out_dir is not None:
        changes["out_dir"] = args.out_dir
    if args.preset is not None:
        from workers.demo_model import PRESETS

        if args.preset not in PRESETS:
            raise SystemExit(f"--preset {args.preset!r} is unknown; use one of {sorted(PRESETS)}.")
        changes["preset"] = args.preset
    if args.size is not None:
        if args.size % 16 or not 64 <= args.size <= 1024:
            raise SystemExit(f"--size {args.size} must be a multiple of 16 from 64 to 1024, such as 384 or 512.")
        changes["size"] = args.size
    if args.steps is not None:
        if not 1 <= args.steps <= 50:
            raise SystemExit(f"--steps {args.steps} must be from 1 to 50.")
        changes["steps"] = args.steps
    if args.warm_on is not None:
        changes["warm_on"] = args.warm_on
    return dataclasses.replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Test model, tiny images, two systems, one rate per mask set; writes under var/bench/.")
    parser.add_argument("--keep", action="store_true", help="Keep the run folders (databases, logs) under var/bench/.")
    parser.add_argument("--requests", type=int, default=None,
                        help="Requests per rate and mask set (default 30; longer traces reach steady-state queues).")
    parser.add_argument("--rates", default=None,
                        help="Comma-separated multiples of the baseline capacity (default 0.5,0.9,1.5,3,6).")
    parser.add_argument("--mask-means", default=None,
                        help="Comma-separated means of the mask-ratio distributions, one trace each "
                             "(default 0.11,0.19).")
    parser.add_argument("--systems", default=None, help=f"Comma-separated systems (default all: {', '.join(s.name for s in SYSTEMS)}).")
    parser.add_argument("--out-dir", type=Path, default=None, help="Folder for serving.{json,md,png}.")
    parser.add_argument("--preset", default=None,
                        help="Demo model preset (default 'demo'; 'bench' is large enough for the transformer to dominate).")
    parser.add_argument("--size", type=int, default=None, help="Working size in pixels, square (default 384).")
    parser.add_argument("--steps", type=int, default=None, help="Denoising steps per job (default 16).")
    parser.add_argument("--warm-on", choices=("every", "one"), default=None,
                        help="Warm each template on every worker (default) or on one worker.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "editor_site.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    config = quick_config() if args.quick else full_config()
    config = customized(config, args)
    rows, env = run_benchmark(config, keep=args.keep)
    headlines = write_report(rows, env, config.out_dir)
    print(json.dumps([asdict(item) for item in headlines], indent=2))
    print(f"report: {config.out_dir / 'serving.md'}")


if __name__ == "__main__":
    main()
