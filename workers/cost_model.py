"""A worker's own cost model: denoising-step time from the tokens it computes, cache-load time from bytes.

Both are straight-line least-squares fits over the most recent measurements:

* step seconds = ``step_intercept_s + step_s_per_token * tokens``, where ``tokens`` are the text and image
  tokens one step computes (all image tokens for a stock step, only the masked ones for a cached step), which
  is what FLOPs scale with at a fixed resolution;
* load seconds = ``load_latency_s + load_s_per_mib * MiB`` for reading a cache entry from the disk tier.

The fit starts from a calibration (stock runs of one and two steps at two sizes) or from the file a previous
run persisted. It is refitted after every job (on a batching worker, after every engine step) and persisted,
at most every few seconds, to ``<EDITOR_VAR_DIR>/cost-model/<worker>/<model>.json``.
The worker publishes it with its state and metrics, where the ``cost`` routing policy reads it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

MAX_SAMPLES = 256
# Calibration image sides in pixels: small enough to take well under a second with the demo models.
CALIBRATION_SIDES = (128, 256)
# Until a load has been measured: a local SSD's latency and bandwidth, an estimate.
ASSUMED_LOAD_LATENCY_S = 0.005
ASSUMED_LOAD_S_PER_MIB = 1 / 500


@dataclass(frozen=True)
class CostFit:
    step_intercept_s: float
    step_s_per_token: float
    load_latency_s: float = ASSUMED_LOAD_LATENCY_S
    load_s_per_mib: float = ASSUMED_LOAD_S_PER_MIB
    step_samples: int = 0
    load_samples: int = 0

    def step_seconds(self, tokens: float) -> float:
        return max(0.0, self.step_intercept_s + self.step_s_per_token * tokens)

    def load_seconds(self, nbytes: float) -> float:
        return max(0.0, self.load_latency_s + self.load_s_per_mib * nbytes / 2**20)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Return the least-squares (intercept, slope) of ys over xs, with intercept >= 0 and slope > 0.

    Through the origin when xs has one distinct value or when the free line would cross zero below it.
    """
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("fit_line needs at least one sample")
    if np.ptp(x) == 0:
        return 0.0, float(y.mean() / x[0]) if x[0] else 0.0
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        # Noise on a few samples can tilt the line; a cost that falls with work is never right.
        return 0.0, float(y.sum() / x.sum())
    if intercept < 0:
        # A negative fixed cost is noise too, because two calibration points fit any line.
        # Fit through the origin instead.
        return 0.0, float((x * y).sum() / (x * x).sum())
    return float(intercept), float(slope)


class CostModel:
    """Thread-safe, persisted fits for one served model on one worker."""

    def __init__(self, path: Path, fit: CostFit, *, steps: list[tuple[float, float]] | None = None,
                 loads: list[tuple[float, float]] | None = None, save_interval_s: float = 0.0) -> None:
        """`save_interval_s` spaces the saves that new samples trigger; `save` itself always writes."""
        self.path = Path(path)
        self.save_interval_s = save_interval_s
        self._saved_at: float | None = None
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, float]] = deque(steps or [], maxlen=MAX_SAMPLES)
        self._loads: deque[tuple[float, float]] = deque(loads or [], maxlen=MAX_SAMPLES)
        self._fit = fit

    @property
    def fit(self) -> CostFit:
        with self._lock:
            return self._fit

    def step_samples(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._steps)

    def record_step(self, tokens: float, seconds_per_step: float) -> None:
        if tokens <= 0 or seconds_per_step <= 0:
            return
        with self._lock:
            self._steps.append((float(tokens), float(seconds_per_step)))
            self._refit()
        self._save_when_due()

    def record_load(self, nbytes: float, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            self._loads.append((float(nbytes) / 2**20, float(seconds)))
            self._refit()
        self._save_when_due()

    def _refit(self) -> None:
        fit = self._fit
        if self._steps:
            intercept, slope = fit_line([t for t, _ in self._steps], [s for _, s in self._steps])
            fit = CostFit(intercept, slope, fit.load_latency_s, fit.load_s_per_mib, len(self._steps), fit.load_samples)
        if self._loads:
            latency, per_mib = fit_line([m for m, _ in self._loads], [s for _, s in self._loads])
            fit = CostFit(fit.step_intercept_s, fit.step_s_per_token, latency, per_mib, fit.step_samples, len(self._loads))
        self._fit = fit

    def _save_when_due(self) -> None:
        with self._lock:
            due = self._saved_at is None or time.monotonic() - self._saved_at >= self.save_interval_s
        if due:
            self.save()

    def save(self) -> None:
        with self._lock:
            self._saved_at = time.monotonic()
            payload = {"fit": asdict(self._fit), "steps": list(self._steps), "loads": list(self._loads),
                       "saved_at": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Job threads and processes of one machine may save at once; each writes its own staging file.
            staging = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            staging.write_text(json.dumps(payload))
            staging.replace(self.path)
        except OSError:
            logger.warning("could not persist the cost model to %s", self.path, exc_info=True)

    @classmethod
    def load(cls, path: Path, *, save_interval_s: float = 0.0) -> CostModel | None:
        """Return the persisted model at `path`, or None when it is missing or unreadable."""
        try:
            payload = json.loads(Path(path).read_text())
            fit = CostFit(**payload["fit"])
            steps = [tuple(sample) for sample in payload.get("steps", [])]
            loads = [tuple(sample) for sample in payload.get("loads", [])]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(path, fit, steps=steps, loads=loads, save_interval_s=save_interval_s)  # type: ignore[arg-type]

    def render_prometheus(self, model: str) -> str:
        fit = self.fit
        lines = []
        for name, value, help_text in (
            ("editor_cost_step_intercept_seconds", fit.step_intercept_s, "Fitted fixed seconds per denoising step"),
            ("editor_cost_step_seconds_per_token", fit.step_s_per_token, "Fitted seconds per computed token per step"),
            ("editor_cost_load_latency_seconds", fit.load_latency_s, "Fitted fixed seconds per cache load"),
            ("editor_cost_load_seconds_per_mib", fit.load_s_per_mib, "Fitted seconds per MiB of cache loaded"),
            ("editor_cost_step_samples", fit.step_samples, "Step timings behind the fit"),
            ("editor_cost_load_samples", fit.load_samples, "Cache-load timings behind the fit"),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f'{name}{{model="{model}"}} {value:.9g}']
        return "\n".join(lines) + "\n"


def calibrate(model, path: Path, *, text_tokens: int, max_sequence_length: int) -> CostModel:
    """Time stock runs of one and two steps at two image sizes; their difference is one step's time."""
    family, pipe = model.family, model.pipe

    def run(side: int, steps: int) -> float:
        image = Image.new("RGB", (side, side), (128, 128, 128))
        mask = Image.new("L", (side, side), 255)
        with model.lock:
            # Timed inside the lock: a warm-up or job holding the model must not count as step time.
            start = time.perf_counter()
            family.stock_edit(pipe, image, mask, "", seed=0, steps=steps, guidance_scale=1.0,
                              max_sequence_length=max_sequence_length)
            return time.perf_counter() - start

    samples = []
    for side in CALIBRATION_SIDES:
        side = max(model.working_multiple, side // model.working_multiple * model.working_multiple)
        run(side, 1)  # first call at a size pays one-time allocations
        step_s = max(1e-6, run(side, 2) - run(side, 1))
        samples.append((float(text_tokens + (side // model.token_pixels) ** 2), step_s))
    intercept, slope = fit_line([t for t, _ in samples], [s for _, s in samples])
    logger.info("cost model of %s calibrated: %.4f s + %.3g s/token per step", model.name, intercept, slope)
    return CostModel(path, CostFit(intercept, slope, step_samples=len(samples)), steps=samples)
