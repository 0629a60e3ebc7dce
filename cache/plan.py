"""Bubble-free load plan: how many blocks per step to compute in full while cache loads run ahead.

Cost model per transformer block, all times in seconds:
* compute(q, kv) = c0 + c1 * q + c2 * q * kv, for q query tokens attending to kv tokens. A full
  block has q = kv = total tokens; a masked block has q = masked tokens and kv = total tokens.
  The q * kv term is attention; c1 covers the projections and the MLP.
* load(bytes) = latency + bytes / bandwidth, for one block's cache, on one copy engine or loader
  thread, so loads run one after another.

Per step the first k blocks run in full, which needs no cache, while loads of later blocks run
ahead. The other blocks run masked and wait for their load. `plan_masked` predicts the finish
time for every k, takes the fastest, and prefers full recompute (no cache at all) unless the
cache is predicted at least `min_gain` faster.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy

from cache.metrics import CacheMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeModel:
    """Seconds per block: c0 + c1 * q + c2 * q * kv, times `scale` (live correction, 1.0 at start)."""

    c0: float
    c1: float
    c2: float
    scale: float = 1.0

    def seconds(self, query_tokens: int, key_tokens: int) -> float:
        raw = self.c0 + self.c1 * query_tokens + self.c2 * query_tokens * key_tokens
        return max(0.0, raw) * self.scale


@dataclass(frozen=True)
class LoadModel:
    """Seconds per block load: latency_s + bytes / bandwidth_bytes_per_s, times `scale`."""

    latency_s: float
    bandwidth_bytes_per_s: float
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} is invalid; it must be > 0.")

    def seconds(self, nbytes: int) -> float:
        return (max(0.0, self.latency_s) + nbytes / self.bandwidth_bytes_per_s) * self.scale


@dataclass(frozen=True)
class BlockProfile:
    """Cost model of one worker: block compute and cache load."""

    compute: ComputeModel
    load: LoadModel


@dataclass(frozen=True)
class LoadPlan:
    """Chosen plan. `full_prefix_blocks` (k) is None when no cache is used at all.

    `predicted_by_k[k]` is the predicted request time with k full blocks per step, for k in
    0..blocks-1; all times are seconds for the whole request (every step and block).
    """

    use_cache: bool
    full_prefix_blocks: int | None
    predicted_s: float
    predicted_sequential_s: float
    predicted_full_recompute_s: float
    predicted_by_k: tuple[float, ...]
    reason: str

    def load_order(self, steps: int, blocks: int) -> list[tuple[int, int]]:
        """Return the (step, block) pairs read from cache, in compute order; empty without cache."""
        if not self.use_cache or self.full_prefix_blocks is None:
            return []
        return [(step, block) for step in range(steps) for block in range(self.full_prefix_blocks, blocks)]


def predict_overlapped(
    profile: BlockProfile,
    *,
    steps: int,
    blocks: int,
    total_tokens: int,
    masked_tokens: int,
    block_bytes: int,
    full_prefix_blocks: int,
    depth: int | None = None,
) -> float:
    """Predict the request time with k = `full_prefix_blocks` full blocks per step.

    Loads run back to back from t = 0 in compute order; with a loader `depth`, load i also waits
    until compute has taken block i - depth off the queue. Compute of a cached block starts when
    both the previous block and its load are done.
    """
    full_s = profile.compute.seconds(total_tokens, total_tokens)
    masked_s = profile.compute.seconds(masked_tokens, total_tokens)
    load_s = profile.load.seconds(block_bytes)
    clock = 0.0  # end of the last compute
    load_end = 0.0  # end of the last load
    taken: list[float] = []  # when compute took each cached block off the queue
    for _ in range(steps):
        for block in range(blocks):
            if block < full_prefix_blocks:
                clock += full_s
                continue
            index = len(taken)
            gate = taken[index - depth] if depth is not None and index >= depth else 0.0
            load_end = max(load_end, gate) + load_s
            start = max(clock, load_end)
            taken.append(start)
            clock = start + masked_s
    return clock


def plan_masked(
    profile: BlockProfile,
    *,
    steps: int,
    blocks: int,
    total_tokens: int,
    masked_tokens: int,
    block_bytes: int,
    depth: int | None = None,
    min_gain: float = 0.05,
    metrics: CacheMetrics | None = None,
) -> LoadPlan:
    """Choose k (full blocks per step) minimizing predicted time, or no cache when that is not faster.

    `min_gain` is the fraction by which the cache must beat full recompute to be used, because
    prediction errors of a few percent would otherwise make the cached path slower. `metrics`, if
    given, counts the decision.
    """
    if steps <= 0 or blocks <= 0:
        raise ValueError(f"steps={steps} and blocks={blocks} are invalid; both must be > 0.")
    if not 0 <= masked_tokens <= total_tokens or total_tokens <= 0:
        raise ValueError(
            f"masked_tokens={masked_tokens} with total_tokens={total_tokens} is invalid; "
            "need 0 <= masked_tokens <= total_tokens and total_tokens > 0."
        )
    full_recompute_s = steps * blocks * profile.compute.seconds(total_tokens, total_tokens)
    sequential_s = steps * blocks * (
        profile.load.seconds(block_bytes) + profile.compute.seconds(masked_tokens, total_tokens)
    )
    by_k = tuple(
        predict_overlapped(
            profile, steps=steps, blocks=blocks, total_tokens=total_tokens, masked_tokens=masked_tokens,
            block_bytes=block_bytes, full_prefix_blocks=k, depth=depth,
        )
        for k in range(blocks)
    )
    best_k = min(range(blocks), key=lambda k: by_k[k])
    best_s = by_k[best_k]
    if best_s > full_recompute_s * (1.0 - min_gain):
        reason = (
            f"full recompute predicted {full_recompute_s:.3f} s; best cached plan (k={best_k}) "
            f"{best_s:.3f} s is not {min_gain:.0%} faster"
        )
        if metrics is not None:
            metrics.record_plan("full_recompute")
        return LoadPlan(False, None, full_recompute_s, sequential_s, full_recompute_s, by_k, reason)
    if best_k == 0:
        reason = f"loads keep up with masked compute; all blocks from cache, predicted {best_s:.3f} s"
    else:
        reason = (
            f"{best_k} full block(s) per step hide load time; predicted {best_s:.3f} s vs "
            f"{by_k[0]:.3f} s with k=0 and {full_recompute_s:.3f} s full recompute"
        )
    if metrics is not None:
        metrics.record_plan("cache" if best_k == 0 else "cache_with_full_prefix")
    return LoadPlan(True, best_k, best_s, sequential_s, full_recompute_s, by_k, reason)


def fit_compute_model(
    token_counts: Sequence[int], seconds: Sequence[float], *, key_tokens: int | None = None
) -> ComputeModel:
    """Fit the compute model to per-block timings at `token_counts` query tokens (least squares).

    Without `key_tokens`, timings are full blocks (q = kv = n) and the fit is c0 + c1 * n + c2 * n^2,
    dropping the quadratic term below 3 points. With `key_tokens`, every timing attended to that
    many tokens (masked runs of one resolution), so q * kv is linear in q: the fit is c0 + c1 * q
    and predictions hold for that key token count only. Coefficients are kept non-negative, so noisy
    timings of a small block never give a model in which more tokens take less time.
    """
    if len(token_counts) != len(seconds) or len(token_counts) < 2:
        raise ValueError(f"need at least 2 (tokens, seconds) pairs of equal length; got {len(token_counts)}.")
    tokens = numpy.asarray(token_counts, dtype=numpy.float64)
    columns = [numpy.ones_like(tokens), tokens]
    if key_tokens is None and len(token_counts) >= 3:
        columns.append(tokens * tokens)
    solution = _non_negative_least_squares(numpy.stack(columns, axis=1), numpy.asarray(seconds, dtype=numpy.float64))
    c2 = float(solution[2]) if len(solution) > 2 else 0.0
    return ComputeModel(c0=float(solution[0]), c1=float(solution[1]), c2=c2)


def _non_negative_least_squares(matrix: numpy.ndarray, target: numpy.ndarray) -> numpy.ndarray:
    """Return the least-squares solution with every coefficient >= 0, trying each subset of the few columns."""
    best, best_residual = numpy.zeros(matrix.shape[1]), float(numpy.sum(target**2))
    for mask in range(1, 1 << matrix.shape[1]):
        chosen = [column for column in range(matrix.shape[1]) if mask >> column & 1]
        partial, *_ = numpy.linalg.lstsq(matrix[:, chosen], target, rcond=None)
        if numpy.any(partial < 0):
            continue
        residual = float(numpy.sum((matrix[:, chosen] @ partial - target) ** 2))
        if residual < best_residual:
            best = numpy.zeros(matrix.shape[1])
            best[chosen] = partial
            best_residual = residual
    return best


def fit_load_model(sizes: Sequence[int], seconds: Sequence[float]) -> LoadModel:
    """Fit latency + bytes / bandwidth to load timings (least squares over 2 or more sizes)."""
    if len(sizes) != len(seconds) or len(set(sizes)) < 2:
        raise ValueError("need load timings at 2 or more distinct sizes to separate latency from bandwidth.")
    matrix = numpy.stack([numpy.ones(len(sizes)), numpy.asarray(sizes, dtype=numpy.float64)], axis=1)
    (latency, seconds_per_byte), *_ = numpy.linalg.lstsq(matrix, numpy.asarray(seconds), rcond=None)
    if seconds_per_byte <= 0:
        raise ValueError(f"load timings {list(seconds)} do not grow with size {list(sizes)}; measure larger sizes.")
    return LoadModel(latency_s=max(0.0, float(latency)), bandwidth_bytes_per_s=1.0 / float(seconds_per_byte))


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def profile_blocks(
    compute_block: Callable[[int], object],
    token_counts: Sequence[int],
    load_bytes: Callable[[int], object],
    sample_sizes: Sequence[int],
    *,
    repeats: int = 3,
) -> BlockProfile:
    """Measure one full block at each token count and one load at each size; fit the models.

    `compute_block(n)` runs one block on n tokens and must finish its device work before it
    returns (e.g. call torch.cuda.synchronize()); `load_bytes(b)` loads b bytes the way the
    loader does. One untimed call of each warms caches and kernels first.
    """
    compute_block(token_counts[0])
    load_bytes(sample_sizes[0])
    compute_seconds = [_median_seconds(lambda n=n: compute_block(n), repeats) for n in token_counts]
    load_seconds = [_median_seconds(lambda b=b: load_bytes(b), repeats) for b in sample_sizes]
    profile = BlockProfile(fit_compute_model(token_counts, compute_seconds), fit_load_model(sample_sizes, load_seconds))
    logger.info("block profile measured: %s", profile)
    return profile


class ProfileTracker:
    """Current profile of a worker, corrected by live measurements (exponential moving average).

    Each measurement moves the model's `scale` towards measured / predicted by `alpha`, so the fitted
    shape stays and its level follows the hardware (thermal throttling, contention).
    """

    def __init__(self, profile: BlockProfile, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} is invalid; use a value in (0, 1].")
        self.alpha = alpha
        self._profile = profile
        self._lock = threading.Lock()

    @property
    def profile(self) -> BlockProfile:
        with self._lock:
            return self._profile

    def record(
        self,
        *,
        compute: tuple[int, int, float] | None = None,
        load: tuple[int, float] | None = None,
    ) -> BlockProfile:
        """Fold in a block compute (query tokens, key tokens, seconds) and/or a load (bytes, seconds)."""
        with self._lock:
            profile = self._profile
            if compute is not None:
                query_tokens, key_tokens, seconds = compute
                model = profile.compute
                predicted = replace(model, scale=1.0).seconds(query_tokens, key_tokens)
                if predicted > 0:
                    scale = (1 - self.alpha) * model.scale + self.alpha * seconds / predicted
                    profile = replace(profile, compute=replace(model, scale=scale))
            if load is not None:
                nbytes, seconds = load
                model = profile.load
                predicted = replace(model, scale=1.0).seconds(nbytes)
                if predicted > 0:
                    scale = (1 - self.alpha) * model.scale + self.alpha * seconds / predicted
                    profile = replace(profile, load=replace(model, scale=scale))
            self._profile = profile
            return profile
