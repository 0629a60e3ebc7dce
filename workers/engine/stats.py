"""Per-step measurements of the engine: scheduling overhead, transformer compute, batch composition."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

DEFAULT_HISTORY = 10_000


@dataclass(frozen=True)
class StepSample:
    """One engine step.

    `overhead_s` is the step's wall time outside the transformer pass: admission, cache planning, packing,
    per-request scheduler updates, callbacks and retirement. `compute_s` is the transformer pass itself.
    `admitted` counts the requests that joined in this step, whose setup is part of its overhead.
    """

    overhead_s: float
    compute_s: float
    batch_size: int
    tokens: int
    admitted: int


@dataclass
class EngineStats:
    """Thread-safe rolling record of the last `history` engine steps that ran a transformer pass."""

    history: int = DEFAULT_HISTORY
    steps_run: int = 0
    _samples: deque[StepSample] = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._samples = deque(maxlen=self.history)

    def record(self, sample: StepSample) -> None:
        with self._lock:
            self._samples.append(sample)
            self.steps_run += 1

    def samples(self) -> list[StepSample]:
        with self._lock:
            return list(self._samples)

    @property
    def batch_sizes(self) -> list[int]:
        return [sample.batch_size for sample in self.samples()]

    @property
    def tokens_per_step(self) -> list[int]:
        return [sample.tokens for sample in self.samples()]

    @property
    def overhead_s(self) -> list[float]:
        return [sample.overhead_s for sample in self.samples()]

    @property
    def compute_s(self) -> list[float]:
        return [sample.compute_s for sample in self.samples()]

    def median_overhead_ms(self) -> float:
        overhead = self.overhead_s
        return 1000 * statistics.median(overhead) if overhead else 0.0

    def render_prometheus(self, model: str) -> str:
        """Gauges over the recorded steps, for the worker's /metrics snapshot."""
        samples = self.samples()
        if not samples:
            return ""
        overhead = sorted(sample.overhead_s for sample in samples)
        values = (
            ("editor_engine_steps", "Engine steps run", self.steps_run),
            ("editor_engine_step_overhead_seconds_median", "Median scheduler time per step outside the "
             "transformer pass", statistics.median(overhead)),
            ("editor_engine_step_overhead_seconds_p95", "95th percentile of the scheduler time per step",
             overhead[min(len(overhead) - 1, int(0.95 * len(overhead)))]),
            ("editor_engine_step_compute_seconds_median", "Median transformer time per step",
             statistics.median(sample.compute_s for sample in samples)),
            ("editor_engine_batch_size_mean", "Mean requests per step", statistics.fmean(s.batch_size for s in samples)),
            ("editor_engine_batch_size_max", "Most requests in one step", max(s.batch_size for s in samples)),
            ("editor_engine_tokens_per_step_mean", "Mean tokens packed per step",
             statistics.fmean(s.tokens for s in samples)),
        )
        lines = []
        for name, help_text, value in values:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f'{name}{{model="{model}"}} {value:.9g}']
        return "\n".join(lines) + "\n"
