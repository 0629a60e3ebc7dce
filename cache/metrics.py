"""Counters and gauges of the activation cache, rendered in Prometheus text format.

All methods are thread-safe. Metric names follow Prometheus conventions: `_total` for counters,
`_bytes` and `_seconds` units in the name.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass

# Upper bounds (seconds) of the load-time histogram buckets.
LOAD_SECONDS_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)

_HELP: dict[str, tuple[str, str]] = {
    "editor_cache_hits_total": ("counter", "Requests served from a cache tier."),
    "editor_cache_misses_total": ("counter", "Requests found in no cache tier."),
    "editor_cache_evictions_total": ("counter", "Entries evicted from a cache tier."),
    "editor_cache_rejections_total": ("counter", "Entries a tier did not accept, by reason."),
    "editor_cache_corrupt_files_total": ("counter", "Disk files removed because they failed validation."),
    "editor_cache_plan_decisions_total": ("counter", "Load plans chosen, by decision."),
    "editor_cache_bytes": ("gauge", "Bytes held by a cache tier."),
    "editor_cache_entries": ("gauge", "Entries held by a cache tier."),
}


@dataclass(frozen=True)
class KeySummary:
    """Admin view of one cached key. `last_used` is a Unix time in seconds; 0 if never read."""

    digest: str
    hits: int
    last_used: float
    size_bytes: int
    tier: str | None


@dataclass
class _KeyState:
    hits: int = 0
    last_used: float = 0.0
    size_bytes: int = 0
    tier: str | None = None


class CacheMetrics:
    """Thread-safe metric registry of one cache store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._load_buckets: dict[str, list[int]] = {}
        self._load_sum: dict[str, float] = defaultdict(float)
        self._load_count: dict[str, int] = defaultdict(int)
        self._keys: dict[str, _KeyState] = {}

    def increment(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += amount

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = value

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._gauges.get((name, tuple(sorted(labels.items()))), 0.0)

    def observe_load(self, seconds: float, tier: str) -> None:
        """Record the time one entry or block took to load from `tier`."""
        with self._lock:
            buckets = self._load_buckets.setdefault(tier, [0] * len(LOAD_SECONDS_BUCKETS))
            for index, bound in enumerate(LOAD_SECONDS_BUCKETS):
                if seconds <= bound:
                    buckets[index] += 1
            self._load_sum[tier] += seconds
            self._load_count[tier] += 1

    def record_plan(self, decision: str) -> None:
        self.increment("editor_cache_plan_decisions_total", decision=decision)

    # Per-key state for the admin -------------------------------------------------------------

    def key_hit(self, digest: str) -> None:
        with self._lock:
            state = self._keys.setdefault(digest, _KeyState())
            state.hits += 1
            state.last_used = time.time()

    def key_placed(self, digest: str, tier: str | None, size_bytes: int) -> None:
        """Record the tier `digest` is stored in now; tier None removes the key's summary."""
        with self._lock:
            if tier is None:
                self._keys.pop(digest, None)
                return
            state = self._keys.setdefault(digest, _KeyState())
            state.tier = tier
            state.size_bytes = size_bytes

    def key_summaries(self) -> list[KeySummary]:
        """Return one summary per known key, most recently used first."""
        with self._lock:
            rows = [
                KeySummary(digest, state.hits, state.last_used, state.size_bytes, state.tier)
                for digest, state in self._keys.items()
            ]
        return sorted(rows, key=lambda row: row.last_used, reverse=True)

    # Exposition ------------------------------------------------------------------------------

    def render_prometheus(self) -> str:
        """Render every metric in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            counters = dict(self._counters)
            gauges = dict(self._gauges)
            buckets = {tier: list(values) for tier, values in self._load_buckets.items()}
            sums = dict(self._load_sum)
            counts = dict(self._load_count)
        lines: list[str] = []
        for name, (kind, help_text) in _HELP.items():
            series = counters if kind == "counter" else gauges
            rows = sorted((labels, value) for (metric, labels), value in series.items() if metric == name)
            if not rows:
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                lines.append(f"{name}{_format_labels(labels)} {_format_value(value)}")
        if buckets:
            name = "editor_cache_load_seconds"
            lines.append(f"# HELP {name} Time to load an entry or block, by source tier.")
            lines.append(f"# TYPE {name} histogram")
            for tier in sorted(buckets):
                for bound, count in zip(LOAD_SECONDS_BUCKETS, buckets[tier], strict=True):
                    labels = (("le", _format_value(bound)), ("tier", tier))
                    lines.append(f"{name}_bucket{_format_labels(labels)} {count}")
                lines.append(f"{name}_bucket{_format_labels((('le', '+Inf'), ('tier', tier)))} {counts[tier]}")
                lines.append(f"{name}_sum{_format_labels((('tier', tier),))} {_format_value(sums[tier])}")
                lines.append(f"{name}_count{_format_labels((('tier', tier),))} {counts[tier]}")
        return "\n".join(lines) + "\n"


def _format_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
