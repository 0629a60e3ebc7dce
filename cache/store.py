"""Host-memory activation store with a hard byte budget, spilling to an optional disk tier.

Budget invariant: `resident bytes + reserved bytes <= budget_bytes` at every moment. Bytes are
reserved before an entry is materialized (encoded or read from disk), and an evicted entry keeps
its bytes reserved until its spill to disk finishes, because its tensors stay alive until then.
The budget counts tensors the store owns. A reader that keeps an evicted entry alive keeps that
memory in use outside the budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from cache.compression import Codec, check_codec, encode, encoded_nbytes_of
from cache.disk import DiskEntryReader, DiskTier
from cache.entry import CacheEntry, EntryMeta
from cache.keys import CacheKey
from cache.metrics import CacheMetrics
from cache.policies import EvictionPolicy

logger = logging.getLogger(__name__)

Tier = Literal["memory", "disk"]


@dataclass(frozen=True)
class StoreStats:
    """Snapshot of the memory tier, sizes in bytes. `peak_bytes` is the maximum of resident + reserved."""

    budget_bytes: int
    resident_bytes: int
    reserved_bytes: int
    peak_bytes: int
    entries: int
    hits: int
    misses: int
    disk_hits: int
    evictions: int
    disk_bytes: int
    disk_entries: int


@dataclass
class _Reservation:
    """Bytes reserved for one incoming entry. The `victims` are spilled before the bytes are usable."""

    size: int
    held: int
    victims: list[tuple[str, CacheKey, CacheEntry]] = field(default_factory=list)


class BudgetError(RuntimeError):
    """Error raised when the byte accounting breaks its invariant, which only a bug can cause."""


class ActivationStore:
    """Thread-safe memory tier of the activation cache under `budget_bytes` (EDITOR_CACHE_BYTES).

    `codec` encodes tensors given to `put_tensors`. `reservation_timeout_s` bounds how long a
    request waits for bytes reserved by other in-flight loads before it gives up. With `write_through`,
    an entry stored in memory is also written to the disk tier, so it outlives the process.
    """

    def __init__(
        self,
        budget_bytes: int,
        policy: EvictionPolicy,
        *,
        disk: DiskTier | None = None,
        codec: Codec = "fp16",
        metrics: CacheMetrics | None = None,
        reservation_timeout_s: float = 30.0,
        write_through: bool = False,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} is invalid; pass 0 (memory tier off) or more.")
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.disk = disk
        self.codec = check_codec(codec)
        self.metrics = metrics or (disk.metrics if disk is not None else CacheMetrics())
        self.reservation_timeout_s = reservation_timeout_s
        self.write_through = write_through
        self._condition = threading.Condition(threading.Lock())
        # Digests being written through to disk, and those of them that drop() removed meanwhile.
        self._writing_through: set[str] = set()
        self._dropped_while_writing: set[str] = set()
        self._entries: dict[str, tuple[CacheKey, CacheEntry]] = {}
        self._spilling: dict[str, tuple[CacheKey, CacheEntry]] = {}
        self._loading: dict[str, threading.Event] = {}
        self._resident = 0
        self._reserved = 0
        self._peak = 0
        self._hits = 0
        self._misses = 0
        self._disk_hits = 0
        self._evictions = 0
        # Digests evicted from memory since `take_evicted_digests` last ran.
        self._evicted_digests: set[str] = set()

    # Reads -----------------------------------------------------------------------------------

    def get(self, key: CacheKey) -> CacheEntry | None:
        """Return the entry from memory or promote it from disk, or return None on a miss.

        An entry larger than the whole memory budget is not promoted. Read it block by block
        through `open_disk_reader`.
        """
        digest = key.digest()
        while True:
            with self._condition:
                found = self._entries.get(digest) or self._spilling.get(digest)
                if found is not None:
                    if digest in self._entries:
                        self.policy.on_hit(digest)
                    self._hits += 1
                    self.metrics.increment("editor_cache_hits_total", tier="memory")
                    self.metrics.key_hit(digest)
                    return found[1]
                loading = self._loading.get(digest)
                if loading is None:
                    self.policy.on_miss(digest)
                    self._loading[digest] = threading.Event()
                    break
            # Another thread is promoting this key; wait for it instead of reading the file twice.
            loading.wait(self.reservation_timeout_s)
        try:
            return self._promote(key)
        finally:
            with self._condition:
                self._loading.pop(digest).set()

    def _promote(self, key: CacheKey) -> CacheEntry | None:
        digest = key.digest()
        size = self.disk.entry_nbytes_of(key) if self.disk is not None else None
        if size is None:
            self._count_miss()
            return None
        reservation = self._reserve(digest, size)
        if reservation is None:
            self._count_miss()
            return None
        started = time.perf_counter()
        entry = self.disk.read(key) if self.disk is not None else None
        if entry is None:
            self._release(reservation)
            self._count_miss()
            return None
        self._commit(key, entry, reservation)
        self.metrics.observe_load(time.perf_counter() - started, "disk")
        with self._condition:
            self._disk_hits += 1
            self._hits += 1
        self.metrics.increment("editor_cache_hits_total", tier="disk")
        self.metrics.key_hit(digest)
        return entry

    def record_miss(self) -> None:
        """Count as a miss a lookup that the caller skipped without reading the store, as for a dropped entry."""
        self._count_miss()

    def _count_miss(self) -> None:
        with self._condition:
            self._misses += 1
        self.metrics.increment("editor_cache_misses_total")

    def open_disk_reader(self, key: CacheKey) -> DiskEntryReader | None:
        """Open the key's disk file for block-by-block reads (see `cache.loader`), or None."""
        return self.disk.open_reader(key) if self.disk is not None else None

    def contains(self, key: CacheKey) -> bool:
        return self.tier_of(key) is not None

    def tier_of(self, key: CacheKey) -> Tier | None:
        return self.tier_of_digest(key.digest())

    def tier_of_digest(self, digest: str) -> Tier | None:
        """Return the tier holding the entry whose key has this `CacheKey.digest()`, or None."""
        with self._condition:
            if digest in self._entries or digest in self._spilling:
                return "memory"
        if self.disk is not None and self.disk.contains_digest(digest):
            return "disk"
        return None

    # Writes ----------------------------------------------------------------------------------

    def put_tensors(
        self,
        key: CacheKey,
        tensors: Mapping[str, torch.Tensor],
        *,
        steps: int,
        blocks: int,
        extra: Mapping[str, str] | None = None,
    ) -> Tier | None:
        """Encode `tensors` with the store codec, store them and return the tier they landed in.

        Bytes are reserved before encoding, so the encoded copy never pushes memory over budget.
        """
        if not tensors:
            raise ValueError(f"put_tensors for key {key.short()} got no tensors; pass the warm-up activations.")
        source_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        meta = EntryMeta(steps=steps, blocks=blocks, codec=self.codec, source_dtype=source_dtype, extra=extra or {})
        size = encoded_nbytes_of(tensors, self.codec)
        reservation = self._reserve_for_put(key, size)
        if reservation is None:
            # NOTE: an entry too large for memory is encoded in full for the disk write, so this
            # transient copy is not counted against the memory budget.
            return self._write_to_disk(key, CacheEntry(encode(tensors, self.codec), meta))
        try:
            entry = CacheEntry(encode(tensors, self.codec), meta)
        except BaseException:
            self._release(reservation)
            raise
        self._commit(key, entry, reservation)
        self._write_through(key, entry)
        return "memory"

    def put(self, key: CacheKey, entry: CacheEntry) -> Tier | None:
        """Store an already encoded entry and return the tier it landed in, or None if dropped."""
        reservation = self._reserve_for_put(key, entry.nbytes)
        if reservation is None:
            return self._write_to_disk(key, entry)
        self._commit(key, entry, reservation)
        self._write_through(key, entry)
        return "memory"

    def _reserve_for_put(self, key: CacheKey, size: int) -> _Reservation | None:
        if size > self.budget_bytes:
            logger.info(
                "cache entry %s (%d bytes) exceeds the memory budget of %d bytes (EDITOR_CACHE_BYTES); "
                "storing it on disk only",
                key.short(), size, self.budget_bytes,
            )
            self.metrics.increment("editor_cache_rejections_total", tier="memory", reason="too_large")
            return None
        return self._reserve(key.digest(), size)

    def _write_through(self, key: CacheKey, entry: CacheEntry) -> None:
        """Copy an entry just stored in memory to the disk tier when `write_through` is on."""
        if not self.write_through or self.disk is None or self.disk.contains(key):
            return
        digest = key.digest()
        with self._condition:
            self._writing_through.add(digest)
        try:
            self.disk.write(key, entry)
        finally:
            with self._condition:
                self._writing_through.discard(digest)
                dropped = digest in self._dropped_while_writing
                self._dropped_while_writing.discard(digest)
        if dropped:
            # drop() ran during the write, so the file must not bring the entry back.
            self.disk.remove(key)
            return
        with self._condition:
            in_memory = digest in self._entries
        if in_memory:
            # The disk write recorded the key as on disk, but memory still serves it first.
            self.metrics.key_placed(digest, "memory", entry.nbytes)

    def _write_to_disk(self, key: CacheKey, entry: CacheEntry) -> Tier | None:
        if self.disk is not None and self.disk.write(key, entry):
            return "disk"
        logger.warning("cache entry %s was not stored in any tier", key.short())
        return None

    def take_evicted_digests(self) -> list[str]:
        """Return the digests evicted from memory or from disk since the last call, and start a new list."""
        with self._condition:
            digests = set(self._evicted_digests)
            self._evicted_digests.clear()
        if self.disk is not None:
            digests.update(self.disk.take_evicted_digests())
        return sorted(digests)

    def drop(self, key: CacheKey) -> bool:
        """Remove the key from every tier and return True if it was stored anywhere."""
        return self.drop_digest(key.digest())

    def drop_digest(self, digest: str) -> bool:
        """Remove the entry whose key has this `CacheKey.digest()` from every tier; True if it was stored."""
        with self._condition:
            if digest in self._writing_through:
                self._dropped_while_writing.add(digest)
            found = self._entries.pop(digest, None)
            if found is not None:
                self._resident -= found[1].nbytes
                self.policy.on_remove(digest)
                self._condition.notify_all()
            # A spilling entry keeps its bytes reserved until its spill ends. The spill then finds the
            # key gone and removes the file it wrote.
            spilling = self._spilling.pop(digest, None)
        on_disk = self.disk.remove_digest(digest) if self.disk is not None else False
        self.metrics.key_placed(digest, None, 0)
        self._update_gauges()
        return found is not None or spilling is not None or on_disk

    # Budget accounting -------------------------------------------------------------------------

    def _reserve(self, digest: str, size: int) -> _Reservation | None:
        """Reserve `size` bytes, evicting by policy. Returns None if they are not free within the timeout."""
        if size > self.budget_bytes:
            return None
        deadline = time.monotonic() + self.reservation_timeout_s
        with self._condition:
            # Resident entries can be evicted, but reserved bytes belong to in-flight work, so wait for it.
            while self.budget_bytes - self._reserved < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._condition.wait(remaining):
                    logger.warning(
                        "cache entry %s: %d bytes not available within %.1f s, %d bytes held by in-flight loads",
                        digest[:12], size, self.reservation_timeout_s, self._reserved,
                    )
                    self.metrics.increment("editor_cache_rejections_total", tier="memory", reason="timeout")
                    return None
            reservation = _Reservation(size=size, held=0)
            free = self.budget_bytes - self._resident - self._reserved
            while free + reservation.held < size:
                victim = self.policy.victim(size)
                if victim is None or victim not in self._entries:
                    raise BudgetError(f"policy {self.policy.name} returned victim {victim!r} that is not resident")
                victim_key, victim_entry = self._entries.pop(victim)
                self.policy.on_remove(victim)
                # The victim's bytes move from resident to reserved until its spill ends.
                self._resident -= victim_entry.nbytes
                self._reserved += victim_entry.nbytes
                self._spilling[victim] = (victim_key, victim_entry)
                reservation.held += victim_entry.nbytes
                reservation.victims.append((victim, victim_key, victim_entry))
            take = max(0, size - reservation.held)
            self._reserved += take
            reservation.held += take
            self._check_budget()
        self._spill(reservation)
        return reservation

    def _spill(self, reservation: _Reservation) -> None:
        """Write the victims to disk, then shrink the reservation to the incoming size."""
        for digest, key, entry in reservation.victims:
            if self.disk is not None and not self.disk.contains(key):
                self.disk.write(key, entry)
                with self._condition:
                    dropped = digest not in self._spilling
                if dropped:
                    # drop() ran during the write; do not bring the entry back.
                    self.disk.remove(key)
            self.metrics.increment("editor_cache_evictions_total", tier="memory")
            on_disk = self.disk is not None and self.disk.contains(key)
            self.metrics.key_placed(digest, "disk" if on_disk else None, entry.nbytes)
        with self._condition:
            for digest, _, _ in reservation.victims:
                self._spilling.pop(digest, None)
                self._evictions += 1
                self._evicted_digests.add(digest)
            excess = reservation.held - reservation.size
            self._reserved -= excess
            reservation.held = reservation.size
            reservation.victims = []
            self._condition.notify_all()

    def _commit(self, key: CacheKey, entry: CacheEntry, reservation: _Reservation) -> None:
        digest = key.digest()
        if entry.nbytes > reservation.held:
            self._release(reservation)
            raise BudgetError(
                f"entry {key.short()} has {entry.nbytes} bytes but only {reservation.held} were reserved"
            )
        with self._condition:
            previous = self._entries.pop(digest, None)
            if previous is not None:
                self._resident -= previous[1].nbytes
                self.policy.on_remove(digest)
            self._reserved -= reservation.held
            self._resident += entry.nbytes
            self._entries[digest] = (key, entry)
            self.policy.on_insert(digest, entry.nbytes)
            self._check_budget()
            self._condition.notify_all()
        self.metrics.key_placed(digest, "memory", entry.nbytes)
        self._update_gauges()

    def _release(self, reservation: _Reservation) -> None:
        with self._condition:
            self._reserved -= reservation.held
            reservation.held = 0
            self._condition.notify_all()

    def _check_budget(self) -> None:
        """Record the peak and fail loudly if the invariant broke (caller holds the lock)."""
        total = self._resident + self._reserved
        self._peak = max(self._peak, total)
        if total > self.budget_bytes or self._reserved < 0 or self._resident < 0:
            raise BudgetError(
                f"memory accounting broke: resident {self._resident} + reserved {self._reserved} "
                f"> budget {self.budget_bytes}"
            )

    # Reporting -------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._condition:
            snapshot = (self._resident, self._reserved, self._peak, len(self._entries), self._hits,
                        self._misses, self._disk_hits, self._evictions)
        disk_bytes = self.disk.used_bytes if self.disk is not None else 0
        disk_entries = self.disk.entry_count if self.disk is not None else 0
        resident, reserved, peak, entries, hits, misses, disk_hits, evictions = snapshot
        return StoreStats(
            budget_bytes=self.budget_bytes, resident_bytes=resident, reserved_bytes=reserved, peak_bytes=peak,
            entries=entries, hits=hits, misses=misses, disk_hits=disk_hits, evictions=evictions,
            disk_bytes=disk_bytes, disk_entries=disk_entries,
        )

    def resident_digests(self) -> list[str]:
        with self._condition:
            return list(self._entries)

    def _update_gauges(self) -> None:
        with self._condition:
            resident, count = self._resident, len(self._entries)
        self.metrics.set_gauge("editor_cache_bytes", resident, tier="memory")
        self.metrics.set_gauge("editor_cache_entries", count, tier="memory")
