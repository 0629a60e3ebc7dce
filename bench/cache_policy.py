"""Replay request traces through each eviction policy and compare hit rates with Belady's optimum.

Run `python -m bench.cache_policy` (writes docs/benchmarks/cache_policy.{json,md,png}) or add
`--quick` for a shorter run written to var/benchmarks/. Entries have unit size: the budget is a
number of entries, `budget_fraction` x the number of templates in the popular pool, and the
optimum is exact Belady (MIN) with bypass, which is optimal for unit sizes.

Traces (seeded, so every run replays the same requests):
* zipf: 1000 templates, Zipf popularity with exponent 0.9; every fifth of the trace the ranking
  rotates by 100 templates, so the hot set moves to templates that were cold before.
* burst: 500 templates with Zipf(0.9) popularity; after every 4000 steady requests comes a burst
  of 400 templates used once each, like a bulk import or a crawler.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.policies import DEFAULT_POLICY, EvictionPolicy, LfuPolicy, LruPolicy, create_policy

logger = logging.getLogger(__name__)

BUDGET_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.10, 0.20)
ZIPF_EXPONENT = 0.9


@dataclass(frozen=True)
class Trace:
    """Requested template ids in order; `templates` is the popular pool the budget is sized on."""

    name: str
    requests: list[int]
    templates: int


@dataclass(frozen=True)
class Row:
    trace: str
    budget_fraction: float
    policy: str
    hit_rate: float


def zipf_sampler(count: int, exponent: float, rng: random.Random) -> Callable[[], int]:
    """Return a function that draws ranks 0..count-1 with probability proportional to 1/(rank+1)^exponent."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(count)]
    ranks = list(range(count))
    return lambda: rng.choices(ranks, weights)[0]


def zipf_shifting_trace(requests: int, seed: int = 1) -> Trace:
    templates, phases, shift = 1000, 5, 100
    rng = random.Random(seed)
    permutation = list(range(templates))
    rng.shuffle(permutation)
    draw_rank = zipf_sampler(templates, ZIPF_EXPONENT, rng)
    trace = []
    for index in range(requests):
        phase = index * phases // requests
        trace.append(permutation[(draw_rank() + phase * shift) % templates])
    return Trace("zipf", trace, templates)


def burst_trace(requests: int, seed: int = 2) -> Trace:
    templates, steady_run, burst_size = 500, 4000, 400
    rng = random.Random(seed)
    permutation = list(range(templates))
    rng.shuffle(permutation)
    draw_rank = zipf_sampler(templates, ZIPF_EXPONENT, rng)
    trace: list[int] = []
    next_one_off = templates
    while len(trace) < requests:
        trace.extend(permutation[draw_rank()] for _ in range(steady_run))
        trace.extend(range(next_one_off, next_one_off + burst_size))
        next_one_off += burst_size
    return Trace("burst", trace[:requests], templates)


def replay(policy: EvictionPolicy, requests: list[int], capacity: int) -> float:
    """Return the hit rate of `policy` on `requests` with room for `capacity` unit-size entries."""
    resident: set[str] = set()
    hits = 0
    for template in requests:
        key = str(template)
        if key in resident:
            hits += 1
            policy.on_hit(key)
            continue
        policy.on_miss(key)
        while len(resident) >= capacity:
            victim = policy.victim(1)
            if victim is None:
                raise RuntimeError(f"policy {policy.name} returned no victim with {len(resident)} resident entries")
            resident.remove(victim)
            policy.on_remove(victim)
        resident.add(key)
        policy.on_insert(key, 1)
    return hits / len(requests)


def replay_belady(requests: list[int], capacity: int) -> float:
    """Return the hit rate of Belady's MIN with bypass: evict (or skip) the furthest next use."""
    never = len(requests)
    next_use = [never] * len(requests)
    last_seen: dict[int, int] = {}
    for index in range(len(requests) - 1, -1, -1):
        next_use[index] = last_seen.get(requests[index], never)
        last_seen[requests[index]] = index
    resident: dict[int, int] = {}  # template -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, template), stale rows skipped
    hits = 0
    for index, template in enumerate(requests):
        upcoming = next_use[index]
        if template in resident:
            hits += 1
        elif len(resident) >= capacity:
            while -heap[0][0] != resident.get(heap[0][1]):
                heapq.heappop(heap)
            furthest, victim = -heap[0][0], heap[0][1]
            if upcoming >= furthest:
                continue  # bypass: the incoming entry is needed later than every resident one
            heapq.heappop(heap)
            del resident[victim]
        resident[template] = upcoming
        heapq.heappush(heap, (-upcoming, template))
    return hits / len(requests)


def policy_factories(capacity: int) -> dict[str, Callable[[], EvictionPolicy]]:
    return {
        "lru": LruPolicy,
        "lfu": LfuPolicy,
        DEFAULT_POLICY: lambda: create_policy(DEFAULT_POLICY, capacity),
    }


def run(requests_per_trace: int) -> list[Row]:
    rows: list[Row] = []
    for trace in (zipf_shifting_trace(requests_per_trace), burst_trace(requests_per_trace)):
        for fraction in BUDGET_FRACTIONS:
            capacity = max(1, round(fraction * trace.templates))
            for name, factory in policy_factories(capacity).items():
                rows.append(Row(trace.name, fraction, name, replay(factory(), trace.requests, capacity)))
            rows.append(Row(trace.name, fraction, "belady", replay_belady(trace.requests, capacity)))
            logger.info("replayed %s at budget fraction %.2f", trace.name, fraction)
    return rows


def write_markdown(rows: list[Row], path: Path, requests_per_trace: int) -> None:
    policies = ["lru", "lfu", DEFAULT_POLICY, "belady"]
    lines = [
        "# Eviction policy hit rates",
        "",
        f"Generated by `python -m bench.cache_policy`: {requests_per_trace} requests per trace, unit-size",
        "entries, budget = fraction x templates in the popular pool, Belady = MIN with bypass (exact for",
        f"unit sizes). Default policy: `{DEFAULT_POLICY}`. Traces are described in the module docstring.",
        "",
        "| trace | budget | " + " | ".join(policies) + " |",
        "|---|---|" + "---|" * len(policies),
    ]
    table: dict[tuple[str, float], dict[str, float]] = {}
    for row in rows:
        table.setdefault((row.trace, row.budget_fraction), {})[row.policy] = row.hit_rate
    for (trace, fraction), rates in table.items():
        cells = " | ".join(f"{rates[name]:.3f}" for name in policies)
        lines.append(f"| {trace} | {fraction:.0%} | {cells} |")
    lines += [
        "",
        f"`{DEFAULT_POLICY}` against LRU: hit-rate points gained on the zipf trace, and the share of LRU's gap",
        "to Belady that it closes on the burst trace.",
        "",
        "| budget | zipf: points over LRU | burst: share of LRU-Belady gap closed |",
        "|---|---|---|",
    ]
    for fraction in sorted({row.budget_fraction for row in rows}):
        zipf, burst = table[("zipf", fraction)], table[("burst", fraction)]
        points = 100 * (zipf[DEFAULT_POLICY] - zipf["lru"])
        closed = (burst[DEFAULT_POLICY] - burst["lru"]) / (burst["belady"] - burst["lru"])
        lines.append(f"| {fraction:.0%} | {points:+.1f} | {closed:.0%} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({row.trace for row in rows}, reverse=True)
    figure, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
    for axis, trace in zip(axes[0], traces, strict=True):
        for policy in ("lru", "lfu", DEFAULT_POLICY, "belady"):
            points = sorted((row.budget_fraction, row.hit_rate) for row in rows if row.trace == trace and row.policy == policy)
            axis.plot([p[0] * 100 for p in points], [p[1] for p in points], marker="o", label=policy)
        axis.set_title(f"{trace} trace")
        axis.set_xlabel("budget (% of templates)")
        axis.set_ylabel("hit rate")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="replay 20000 requests per trace and write to var/")
    parser.add_argument("--requests", type=int, default=None, help="requests per trace (default 100000)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    requests_per_trace = arguments.requests or (20000 if arguments.quick else 100000)
    output = Path("var/benchmarks") if arguments.quick else Path("docs/benchmarks")
    output.mkdir(parents=True, exist_ok=True)

    rows = run(requests_per_trace)
    report = {"default_policy": DEFAULT_POLICY, "requests_per_trace": requests_per_trace, "rows": [asdict(row) for row in rows]}
    (output / "cache_policy.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(rows, output / "cache_policy.md", requests_per_trace)
    write_plot(rows, output / "cache_policy.png")
    logger.info("wrote %s", output / "cache_policy.md")


if __name__ == "__main__":
    main()
