"""A worker's load record for the router: when its job process will be free, its cost fits and its caches.

The heartbeat (workers/heartbeat.py) marks a worker alive and lists the models it serves. This record, written
by the process that runs the jobs, contains its fitted speed and its cache entries. The ``cost`` routing policy
(editing/cost_routing.py) reads both, plus the backlog of jobs already routed to the worker and not yet
started, which submitters add to and this process removes from when it takes a job.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import redis
from django.conf import settings

from cache.keys import CacheKey
from editor_site import redis_keys
from workers.cost_model import CostFit, CostModel, calibrate
from workers.model_loading import DEFAULT_VAR_DIR, LoadedModel
from workers.runner import RunnerSettings
from workers.template_cache import get_store

logger = logging.getLogger(__name__)

STATE_TTL_S = 600
# Until the calibration or a first job has measured this worker: 0.1 ms per token per step plus 10 ms,
# about a small model on a laptop CPU. Live timings replace it after one job.
PRIOR_FIT = CostFit(step_intercept_s=0.01, step_s_per_token=1e-4)
# A batching worker records a sample per engine step, and writing the file each time took 0.4 ms of the
# engine thread. So each sample refits at once, and the file is written at most this often.
COST_SAVE_INTERVAL_S = 5.0
MAX_RESIDENT_TOKENS = 512

_lock = threading.Lock()
# Held while a cost model is loaded or created. `_lock` may be taken inside it, never the reverse.
_create_lock = threading.Lock()
_cost_models: dict[str, CostModel] = {}
_text_tokens: dict[str, int] = {}  # model name -> text tokens per request, as its cost model counts them
_known_keys: OrderedDict[str, str] = OrderedDict()  # residency token -> CacheKey.digest() of the entry
# job id -> (predicted finish in epoch seconds, tokens per step) of the jobs running in this process
_in_flight: dict[str, tuple[float, float]] = {}


def residency_token(model: str, key: CacheKey) -> str:
    """Return the cache identity as the web side computes it from a job: model, template, steps, seed, guidance."""
    return warmup_residency_token(model, key.template_hash, key.steps, key.seed, key.guidance)


def warmup_residency_token(model: str, template_hash: str, steps: int, seed: int, guidance: float) -> str:
    """Return the residency token of a warm-up's entry from the fields a `CacheWarmup` row stores."""
    return f"{model}:{template_hash}:{steps}:{seed}:{float(guidance):g}"


def cost_model_path(hostname: str, model_name: str) -> Path:
    """Return the file where the worker `hostname` persists its fit of `model_name`, one per worker and model.

    Workers on one machine share EDITOR_VAR_DIR but not their speed: each has its own cores, device and load.
    """
    var_dir = Path(os.environ.get("EDITOR_VAR_DIR") or DEFAULT_VAR_DIR)
    folder = "".join(char if char.isalnum() or char in "-_@" else "_" for char in hostname) or "worker"
    return var_dir / "cost-model" / folder / f"{model_name}.json"


def cost_model(model: LoadedModel, *, hostname: str, text_tokens: int, max_sequence_length: int) -> CostModel:
    """Return this process's cost model of `model`: the fit `hostname` persisted, else a prior to calibrate.

    The calibration runs on a background thread, so the job that requested the model is not delayed. Its
    own timings and those of later jobs refine whichever fit is current.
    """
    with _lock:
        _text_tokens[model.name] = text_tokens
    # Job threads of a batching worker start together: one of them creates the model and its calibration.
    with _create_lock:
        with _lock:
            existing = _cost_models.get(model.name)
        if existing is not None:
            return existing
        path = cost_model_path(hostname, model.name)
        loaded = CostModel.load(path, save_interval_s=COST_SAVE_INTERVAL_S)
        if loaded is not None:
            logger.info("cost model of %s loaded from %s (%d step samples)", model.name, path, loaded.fit.step_samples)
        else:
            loaded = CostModel(path, PRIOR_FIT, save_interval_s=COST_SAVE_INTERVAL_S)
            threading.Thread(
                target=_calibrate_into, args=(loaded, model, text_tokens, max_sequence_length),
                name=f"calibrate-{model.name}", daemon=True,
            ).start()
        with _lock:
            _cost_models[model.name] = loaded
        return loaded


def _calibrate_into(target: CostModel, model: LoadedModel, text_tokens: int, max_sequence_length: int) -> None:
    try:
        measured = calibrate(model, target.path, text_tokens=text_tokens, max_sequence_length=max_sequence_length)
    except Exception:  # noqa: BLE001 - a failed calibration leaves the prior, which live timings correct
        logger.warning("cost model calibration of %s failed; keeping the prior", model.name, exc_info=True)
        return
    for tokens, seconds in measured.step_samples():
        target.record_step(tokens, seconds)


def loaded_cost_models() -> dict[str, CostModel]:
    with _lock:
        return dict(_cost_models)


def remember_cache(model: str, key: CacheKey) -> None:
    """Note a cache entry this process wrote or read, so its tier can be published."""
    remember_entry(residency_token(model, key), key.digest())


def remember_entry(token: str, digest: str) -> None:
    """Note the entry with key digest `digest` under its residency token, so its tier can be published."""
    with _lock:
        _known_keys[token] = digest
        _known_keys.move_to_end(token)
        while len(_known_keys) > MAX_RESIDENT_TOKENS:
            _known_keys.popitem(last=False)


def start_job(job_id: str, predicted_finish: float, tokens: float) -> None:
    """Count a job this process is running until `finish_job`; the latest predicted finish is published."""
    with _lock:
        _in_flight[job_id] = (predicted_finish, tokens)


def running_tokens() -> float:
    """Tokens per step of the jobs running in this process, which a batching engine packs together."""
    with _lock:
        return sum(tokens for _, tokens in _in_flight.values())


def finish_job(job_id: str) -> None:
    with _lock:
        _in_flight.pop(job_id, None)


def take_from_backlog(hostname: str, job_id: str) -> None:
    """Remove a job the submitting side counted in this worker's backlog, now that it has started."""
    try:
        redis_keys.client().hdel(redis_keys.worker_backlog_key(hostname), job_id)
    except (redis.RedisError, ValueError):
        logger.warning("could not update the backlog of %s", hostname, exc_info=True)


def snapshot() -> dict[str, object]:
    store = get_store()
    with _lock:
        known = list(_known_keys.items())
        # Job threads of a batching worker run together, so the last predicted finish frees the worker.
        busy_until = max((finish for finish, _ in _in_flight.values()), default=0.0)
        running = len(_in_flight)
        tokens = sum(tokens for _, tokens in _in_flight.values())
        models = dict(_cost_models)
        text_tokens = dict(_text_tokens)
    resident: dict[str, list[str]] = {"memory": [], "disk": []}
    for token, digest in known:
        tier = store.tier_of_digest(digest)
        if tier in resident:
            resident[tier].append(token)
    costs = {}
    for name, model in models.items():
        fit = model.fit
        costs[name] = {
            "step_intercept_s": fit.step_intercept_s, "step_s_per_token": fit.step_s_per_token,
            "load_latency_s": fit.load_latency_s, "load_s_per_mib": fit.load_s_per_mib,
            "text_tokens": text_tokens.get(name, 0),
        }
    return {
        "busy_until": busy_until, "running": running, "running_tokens": tokens,
        "slots": settings.EDITOR_ENGINE_MAX_BATCH, "costs": costs, "resident": resident, "pid": os.getpid(),
        "max_work_pixels": RunnerSettings.from_env().max_work_pixels, "at": time.time(),
    }


def publish(hostname: str, *, keep_published_costs: bool = False) -> None:
    """Write this process's state under the worker's name; best effort, like metrics.

    With `keep_published_costs`, the cost fits already published under this name stay in the record
    for the models this process has not loaded yet. A process that starts, or that has run no job,
    publishes this way, because the router skips a worker whose record lacks the model's fit.
    """
    try:
        client = redis_keys.client()
        record = snapshot()
        if keep_published_costs:
            record["costs"] = {**published_costs(client, hostname), **record["costs"]}
        client.set(redis_keys.worker_load_key(hostname), json.dumps(record), ex=STATE_TTL_S)
    except (redis.RedisError, ValueError):
        logger.warning("could not publish the state of %s", hostname, exc_info=True)


def published_costs(client: redis.Redis, hostname: str) -> dict[str, dict]:
    """Return the cost fits in the load record published under `hostname`; empty without a readable one."""
    raw = client.get(redis_keys.worker_load_key(hostname))
    if raw is None:
        return {}
    try:
        costs = json.loads(raw).get("costs")
    except (ValueError, AttributeError):
        logger.warning("ignoring the malformed load record of %s", hostname)
        return {}
    return costs if isinstance(costs, dict) else {}
