"""Eviction policies for the memory tier, behind one interface (`EvictionPolicy`).

`lru` and `lfu` are the classic baselines. The default, `wtinylfu`, is W-TinyLFU (Einziger,
Friedman and Manes, "TinyLFU: A Highly Efficient Cache Admission Policy", ACM TOS 2017), the
policy of the Caffeine cache:

* a small LRU *window* takes every new entry, so a template that was just warmed up survives the
  edits that usually follow it;
* the *main* region is a segmented LRU (probation, protected) of entries that won a duel. When
  space is needed, the oldest window entry (the candidate) is compared with the oldest main entry
  (the victim) by request frequency, and the less frequent one is evicted;
* frequencies count every request, hits and misses, including keys that are not resident, and
  are halved every `aging_period` requests, so popularity ages and a shifted hot set takes over.

Why this one: a burst of one-off templates has frequency 1 and loses every duel against a hot
template, so hot entries survive the burst (plain LRU flushes them); a template that becomes hot
gains frequency while it is not resident and wins its way in (plain LFU keeps stale counts).
GDSF and LRU-K were the alternatives: GDSF has no memory of non-resident keys, and LRU-K needs a
retained-history size that is as hard to set as the window here. Hit rates are in
docs/benchmarks/cache_policy.md.

Policies only track keys (digest strings) and sizes in bytes; the store owns the data and calls
`victim()` until the incoming entry fits. Policies are not thread-safe: the store calls them under
its lock.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict

POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "wtinylfu")
DEFAULT_POLICY = "wtinylfu"


class EvictionPolicy(ABC):
    """Order in which resident entries leave the memory tier."""

    name: str = ""

    @abstractmethod
    def on_hit(self, key: str) -> None:
        """Record a request that found `key` resident."""

    @abstractmethod
    def on_miss(self, key: str) -> None:
        """Record a request for `key` that was not resident (it may be inserted next)."""

    @abstractmethod
    def on_insert(self, key: str, size: int) -> None:
        """Record that `key` (size in bytes) became resident."""

    @abstractmethod
    def on_remove(self, key: str) -> None:
        """Record that `key` left the memory tier (evicted or dropped); unknown keys are ignored."""

    @abstractmethod
    def victim(self, incoming_size: int) -> str | None:
        """Return the resident key to evict next to make room for `incoming_size` bytes, or None if empty.

        The store removes the returned key (and calls `on_remove`) before asking again.
        """

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of resident keys the policy tracks."""


class LruPolicy(EvictionPolicy):
    """Evict the least recently used entry."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, int] = OrderedDict()

    def on_hit(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_miss(self, key: str) -> None:
        pass

    def on_insert(self, key: str, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, incoming_size: int) -> str | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)


class LfuPolicy(EvictionPolicy):
    """Evict the entry with the fewest hits since it became resident; ties go to the least recent.

    Counts are in-cache only: an evicted key starts again at 1, as in textbook LFU.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, int]] = {}  # key -> (frequency, last access tick)
        self._heap: list[tuple[int, int, str]] = []  # lazy: stale rows are skipped in victim()
        self._tick = itertools.count()

    def _touch(self, key: str, frequency: int) -> None:
        tick = next(self._tick)
        self._state[key] = (frequency, tick)
        heapq.heappush(self._heap, (frequency, tick, key))

    def on_hit(self, key: str) -> None:
        if key in self._state:
            self._touch(key, self._state[key][0] + 1)

    def on_miss(self, key: str) -> None:
        pass

    def on_insert(self, key: str, size: int) -> None:
        self._touch(key, 1)

    def on_remove(self, key: str) -> None:
        self._state.pop(key, None)

    def victim(self, incoming_size: int) -> str | None:
        while self._heap:
            frequency, tick, key = self._heap[0]
            if self._state.get(key) == (frequency, tick):
                return key
            heapq.heappop(self._heap)
        return None

    def __len__(self) -> int:
        return len(self._state)


class FrequencyHistory:
    """Request counts per key, halved every `aging_period` requests.

    An exact dict replaces TinyLFU's count-min sketch, because a worker sees few distinct
    templates. Halving drops keys whose count reaches 0, which bounds the dict to the keys seen
    within the last few periods. Counts saturate at 15 like TinyLFU's 4-bit counters.
    """

    MAX_COUNT = 15

    def __init__(self, aging_period: int) -> None:
        if aging_period <= 0:
            raise ValueError(f"aging_period={aging_period} is invalid; pass a positive number of requests.")
        self.aging_period = aging_period
        self._counts: dict[str, int] = {}
        self._requests = 0

    def record(self, key: str) -> None:
        self._counts[key] = min(self._counts.get(key, 0) + 1, self.MAX_COUNT)
        self._requests += 1
        if self._requests >= self.aging_period:
            self._age()

    def frequency(self, key: str) -> int:
        return self._counts.get(key, 0)

    def _age(self) -> None:
        self._requests = 0
        self._counts = {key: count // 2 for key, count in self._counts.items() if count // 2 > 0}


class WTinyLfuPolicy(EvictionPolicy):
    """W-TinyLFU: LRU window, then a segmented LRU main region guarded by a frequency duel.

    `capacity_bytes` is the memory budget the store enforces. The window gets `window_fraction` of
    it and the protected segment `protected_fraction` of the main region. `aging_period` defaults
    to `AGING_REQUESTS_PER_ENTRY` requests per resident entry, estimated from the entry sizes seen.

    Defaults come from a sweep on the traces of bench/cache_policy.py (window 1-20 %, aging 10-40
    requests per entry, docs/cache.md). With 10 requests per entry, a burst of one-off templates
    longer than the aging period halves hot counts to 0, and a one-off with count 1 wins the duel.
    A burst shorter than the aging period (40 x the estimated resident entry count) halves hot
    counts at most once.
    """

    AGING_REQUESTS_PER_ENTRY = 40

    name = "wtinylfu"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        window_fraction: float = 0.05,
        protected_fraction: float = 0.8,
        aging_period: int | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes={capacity_bytes} is invalid; pass the memory budget in bytes.")
        if not 0.0 <= window_fraction < 1.0:
            raise ValueError(f"window_fraction={window_fraction} is invalid; use a value in [0, 1).")
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError(f"protected_fraction={protected_fraction} is invalid; use a value in [0, 1).")
        self.capacity_bytes = capacity_bytes
        self.window_bytes_max = int(capacity_bytes * window_fraction)
        self.protected_bytes_max = int((capacity_bytes - self.window_bytes_max) * protected_fraction)
        self._fixed_aging_period = aging_period
        self._history = FrequencyHistory(aging_period or 64)
        self._window: OrderedDict[str, int] = OrderedDict()
        self._probation: OrderedDict[str, int] = OrderedDict()
        self._protected: OrderedDict[str, int] = OrderedDict()
        self._window_bytes = 0
        self._probation_bytes = 0
        self._protected_bytes = 0
        self._size_total = 0
        self._size_count = 0

    # Requests -------------------------------------------------------------------------------

    def on_hit(self, key: str) -> None:
        self._history.record(key)
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._probation:
            size = self._probation.pop(key)
            self._probation_bytes -= size
            self._protected[key] = size
            self._protected_bytes += size
            self._demote_protected_overflow()
        elif key in self._protected:
            self._protected.move_to_end(key)

    def on_miss(self, key: str) -> None:
        self._history.record(key)

    def frequency(self, key: str) -> int:
        return self._history.frequency(key)

    # Residency ------------------------------------------------------------------------------

    def on_insert(self, key: str, size: int) -> None:
        self.on_remove(key)
        self._window[key] = size
        self._window_bytes += size
        self._size_total += size
        self._size_count += 1
        self._update_aging_period()
        self._flush_window(0)

    def on_remove(self, key: str) -> None:
        if key in self._window:
            self._window_bytes -= self._window.pop(key)
        elif key in self._probation:
            self._probation_bytes -= self._probation.pop(key)
        elif key in self._protected:
            self._protected_bytes -= self._protected.pop(key)
        else:
            return
        self._flush_window(0)

    def victim(self, incoming_size: int) -> str | None:
        # The incoming entry joins the window; what the window cannot hold becomes the candidate.
        self._flush_window(incoming_size)
        candidate = self._window_candidate(incoming_size)
        main_victim = self._main_victim()
        if candidate is None:
            return main_victim if main_victim is not None else next(iter(self._window), None)
        if main_victim is None:
            return candidate
        # Ties evict the candidate: a newcomer must be strictly more popular to displace a resident.
        if self._history.frequency(candidate) > self._history.frequency(main_victim):
            return main_victim
        return candidate

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    # Internals ------------------------------------------------------------------------------

    def _main_bytes(self) -> int:
        return self._probation_bytes + self._protected_bytes

    def _window_candidate(self, incoming_size: int) -> str | None:
        if self._window and self._window_bytes + incoming_size > self.window_bytes_max:
            return next(iter(self._window))
        return None

    def _main_victim(self) -> str | None:
        if self._probation:
            return next(iter(self._probation))
        return next(iter(self._protected), None)

    def _flush_window(self, incoming_size: int) -> None:
        """Move window-overflow entries into probation while the main region has free room."""
        main_bytes_max = self.capacity_bytes - self.window_bytes_max
        main_bytes = self._main_bytes()
        while self._window and self._window_bytes + incoming_size > self.window_bytes_max:
            key, size = next(iter(self._window.items()))
            if main_bytes + size > main_bytes_max:
                return
            del self._window[key]
            self._window_bytes -= size
            self._probation[key] = size
            self._probation_bytes += size
            main_bytes += size

    def _demote_protected_overflow(self) -> None:
        while self._protected_bytes > self.protected_bytes_max and len(self._protected) > 1:
            key, size = self._protected.popitem(last=False)
            self._protected_bytes -= size
            self._probation[key] = size
            self._probation_bytes += size

    def _update_aging_period(self) -> None:
        if self._fixed_aging_period is not None:
            return
        mean_size = self._size_total / self._size_count
        resident_estimate = max(1, int(self.capacity_bytes / mean_size))
        self._history.aging_period = max(64, self.AGING_REQUESTS_PER_ENTRY * resident_estimate)


def create_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """Build the policy named by `EDITOR_CACHE_POLICY` for a memory budget of `capacity_bytes`."""
    if name == "lru":
        return LruPolicy()
    if name == "lfu":
        return LfuPolicy()
    if name == "wtinylfu":
        return WTinyLfuPolicy(capacity_bytes)
    raise ValueError(f"cache policy {name!r} is not supported; use one of {POLICY_NAMES}.")
