"""Background promotion of disk entries into memory, for jobs queued on a template.

When a job is queued for a template whose cache sits on disk, `Prefetcher.prefetch(key)` starts
reading it into the memory tier so the job finds it resident. Calls are idempotent: a key has at
most one prefetch in flight, and further calls return the same future.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cache.keys import CacheKey
from cache.store import ActivationStore

logger = logging.getLogger(__name__)


class Prefetcher:
    """Promotes entries from disk to memory on `max_workers` background threads."""

    def __init__(self, store: ActivationStore, max_workers: int = 1) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} is invalid; pass at least 1.")
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cache-prefetch")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[bool]] = {}

    def prefetch(self, key: CacheKey) -> Future[bool]:
        """Start promoting `key`; the future yields True once it is resident in memory.

        A key already in memory (or not on disk) gets a completed future without a load.
        """
        digest = key.digest()
        with self._lock:
            running = self._in_flight.get(digest)
            if running is not None:
                return running
            tier = self.store.tier_of(key)
            if tier != "disk":
                done: Future[bool] = Future()
                done.set_result(tier == "memory")
                return done
            future = self._executor.submit(self._promote, key)
            self._in_flight[digest] = future
        future.add_done_callback(lambda _: self._forget(digest))
        return future

    def _promote(self, key: CacheKey) -> bool:
        try:
            entry = self.store.get(key)
        except Exception:  # a prefetch is best effort; the job loads on its own if this fails
            logger.exception("prefetch of cache entry %s failed", key.short())
            return False
        if entry is None:
            logger.info("prefetch of cache entry %s found nothing to load (evicted or corrupt)", key.short())
            return False
        return self.store.tier_of(key) == "memory"

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._in_flight.pop(digest, None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def close(self) -> None:
        """Wait for running prefetches and stop the threads."""
        self._executor.shutdown(wait=True)
