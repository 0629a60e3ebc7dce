"""The ``cost`` routing policy: send each job to the live worker predicted to finish it first.

For every live worker that serves the job's model, the predicted finish is

    wait = time until its running jobs end (its published ``busy_until``)
         + predicted seconds of the jobs already routed to it and not yet started (its backlog),
           or 0 on a batching worker with a free slot, where the job joins the running batch
    run  = steps x step seconds from its fitted cost model, at the tokens the job will compute there:
           text + masked tokens where its cache contains the template, plus the load time when that entry is on
           its disk tier; text + all image tokens where it does not (the job runs in full and warms the cache)

and the job goes to the worker's own queue with the smallest ``wait + run``. The prediction is added to
that worker's backlog until the worker takes the job. A worker that has published no fit for the model yet
(it has run nothing since it started) is predicted with the median of the other workers' fits, so it is not
passed over for good. When no worker has a fit, the caller falls back to the mask-ratio bucket queues.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass

import redis
from django.conf import settings

from editing import catalog, fleet
from editing.imaging import fit_working_size
from editor_site import redis_keys

logger = logging.getLogger(__name__)

# Above this share of masked tokens the worker runs the stock computation (workers/caching.py).
BYPASS_MASK_RATIO = 0.9
BACKLOG_TTL_S = 24 * 3600
# RunnerSettings.max_work_pixels when EDITOR_MAX_WORK_PIXELS is not set (workers/runner.py).
DEFAULT_MAX_WORK_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class JobShape:
    """Job facts that the router has before any worker has looked at the job."""

    model: str
    template_hash: str
    width: int
    height: int
    mask_ratio: float
    steps: int
    seed: int
    guidance: float

    @property
    def residency_token(self) -> str:
        # Same form as workers/worker_state.residency_token.
        return f"{self.model}:{self.template_hash}:{self.steps}:{self.seed}:{float(self.guidance):g}"


@dataclass(frozen=True)
class Candidate:
    hostname: str
    queue: str
    wait_s: float
    run_s: float
    cache: str  # "memory", "disk" or "none"

    @property
    def finish_s(self) -> float:
        return self.wait_s + self.run_s


def image_tokens(shape: JobShape, max_work_pixels: int) -> int:
    """Return the image tokens of `shape` on a worker that scales images down to `max_work_pixels`."""
    spec = catalog.get(shape.model) or catalog.default_model()
    patch = spec.facts.pixels_per_token
    width, height = fit_working_size(shape.width, shape.height, max_work_pixels, patch)
    return math.ceil(width / patch) * math.ceil(height / patch)


def predict(
    shape: JobShape, load: dict, backlog_s: float, now: float, backlog_jobs: int = 0
) -> tuple[float, float, str] | None:
    """(wait seconds, run seconds, cache tier) of `shape` on a worker with published `load`; None if unknown.

    A batching worker with a free slot (`slots` above its running and routed jobs) starts the job at once,
    and each of its steps then also carries the tokens of the jobs already running there.
    """
    cost = (load.get("costs") or {}).get(shape.model)
    if not cost:
        return None
    # Records from workers that predate the field carry no limit, so they get the workers' default.
    tokens = image_tokens(shape, int(load.get("max_work_pixels") or DEFAULT_MAX_WORK_PIXELS))
    text = float(cost.get("text_tokens", 0))
    resident = load.get("resident") or {}
    tier = next((name for name in ("memory", "disk") if shape.residency_token in resident.get(name, [])), "none")
    cached = tier != "none" and shape.mask_ratio < BYPASS_MASK_RATIO
    computed = text + (shape.mask_ratio * tokens if cached else tokens)
    slots = int(load.get("slots", 1))
    joins_batch = slots > 1 and int(load.get("running", 0)) + backlog_jobs < slots
    if joins_batch:
        computed += float(load.get("running_tokens", 0.0))
    step_s = max(0.0, cost["step_intercept_s"] + cost["step_s_per_token"] * computed)
    run_s = shape.steps * step_s
    if cached and tier == "disk":
        run_s += cost.get("load_latency_s", 0.0)
    wait_s = 0.0 if joins_batch else max(0.0, float(load.get("busy_until", 0.0)) - now) + backlog_s
    return wait_s, run_s, tier if cached else "none"


@dataclass
class WorkerView:
    """One live worker as the router last read it: models, load record and backlog seconds."""

    hostname: str
    models: tuple[str, ...]
    load: dict
    backlog_s: float
    backlog_jobs: int


_snapshot_lock = threading.Lock()
_snapshot: tuple[float, list[WorkerView]] | None = None


def read_fleet() -> list[WorkerView] | None:
    """Read every live worker's heartbeat, load record and backlog from Redis; None when Redis fails."""
    workers = fleet.live_workers()
    if workers is None:
        return None
    if not workers:
        return []
    try:
        pipe = redis_keys.client().pipeline(transaction=False)
        pipe.mget([redis_keys.worker_load_key(worker.hostname) for worker in workers])
        for worker in workers:
            pipe.hvals(redis_keys.worker_backlog_key(worker.hostname))
        loads, *backlogs = pipe.execute()
    except (redis.RedisError, ValueError):
        logger.warning("could not read worker loads; routing by bucket", exc_info=True)
        return None
    views = []
    for worker, raw, backlog in zip(workers, loads, backlogs):
        if raw is None:
            continue  # no job process has published yet
        try:
            load = json.loads(raw)
            resident = load.get("resident") or {}
            # Sets, because every decision looks a template up in every worker's list.
            load["resident"] = {tier: set(tokens) for tier, tokens in resident.items()}
            if fleet.process_restarted(worker.hostname, float(load.get("at", 0.0)), workers):
                # Written by the process before a restart: its memory tier is gone with it, while its
                # disk files may still be there. The new process rewrites the record when it starts.
                load["resident"].pop("memory", None)
            views.append(WorkerView(
                worker.hostname, worker.models, load, sum(float(value) for value in backlog), len(backlog)
            ))
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("ignoring the malformed load record of %s", worker.hostname)
    return views


def fleet_view() -> list[WorkerView]:
    """Return the live workers, re-read from Redis at most every EDITOR_ROUTING_REFRESH_S seconds.

    Between reads the backlog this process adds is applied to the view at once, so a burst of jobs
    spreads over the workers instead of piling onto the one that looked idle at the last read.
    """
    global _snapshot
    now = time.monotonic()
    with _snapshot_lock:
        if _snapshot is not None and now - _snapshot[0] < settings.EDITOR_ROUTING_REFRESH_S:
            return _snapshot[1]
    views = read_fleet()
    if views is None:
        return []
    with _snapshot_lock:
        _snapshot = (now, views)
    return views


def forget_fleet_view() -> None:
    global _snapshot
    with _snapshot_lock:
        _snapshot = None


FIT_FIELDS = ("step_intercept_s", "step_s_per_token", "load_latency_s", "load_s_per_mib", "text_tokens")


def published_fit(view: WorkerView, model: str) -> dict | None:
    """Return the cost fit of `model` that the worker published in its load record, or None."""
    return (view.load.get("costs") or {}).get(model) or None


def fleet_median_fit(published: list[dict | None]) -> dict | None:
    """Return the median of each fit field over the published fits, or None if no worker published one."""
    fits = [fit for fit in published if fit]
    if not fits:
        return None
    return {
        field: statistics.median(float(fit.get(field, 0.0)) for fit in fits)
        for field in FIT_FIELDS
    }


def candidates(shape: JobShape) -> list[Candidate]:
    now = time.time()
    found = []
    views = [view for view in fleet_view() if shape.model in view.models]
    fits = [published_fit(view, shape.model) for view in views]
    # Most decisions find every worker fitted, so the medians are computed only when one is not.
    median_fit = None if all(fits) else fleet_median_fit(fits)
    for view, fit in zip(views, fits):
        load = view.load
        if fit is None:
            if median_fit is None:
                continue
            load = {**load, "costs": {**(load.get("costs") or {}), shape.model: median_fit}}
        prediction = predict(shape, load, view.backlog_s, now, view.backlog_jobs)
        if prediction is not None:
            wait_s, run_s, tier = prediction
            found.append(Candidate(view.hostname, redis_keys.direct_queue(view.hostname), wait_s, run_s, tier))
    return found


def choose(shape: JobShape) -> Candidate | None:
    """Return the candidate with the earliest predicted finish (ties: less waiting), or None without one."""
    found = candidates(shape)
    if not found:
        return None
    return min(found, key=lambda candidate: (candidate.finish_s, candidate.wait_s, candidate.hostname))


def add_to_backlog(candidate: Candidate, job_id: str) -> None:
    """Count the job in its worker's backlog, in Redis for every router and in this process's view."""
    with _snapshot_lock:
        for view in _snapshot[1] if _snapshot is not None else []:
            if view.hostname == candidate.hostname:
                view.backlog_s += candidate.run_s
                view.backlog_jobs += 1
    try:
        client = redis_keys.client()
        key = redis_keys.worker_backlog_key(candidate.hostname)
        client.hset(key, job_id, f"{candidate.run_s:.6f}")
        client.expire(key, BACKLOG_TTL_S)
    except (redis.RedisError, ValueError):
        logger.warning("could not record job %s in the backlog of %s", job_id, candidate.hostname, exc_info=True)


def hostname_of_direct_queue(queue: str) -> str | None:
    prefix = redis_keys.direct_queue("")
    return queue[len(prefix):] if queue.startswith(prefix) else None
