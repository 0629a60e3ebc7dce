"""Disk tier: safetensors files under a byte budget, written atomically and checksummed.

Each entry is one file `<key digest>.safetensors`. Its metadata holds the canonical key, the entry
metadata and a sha256 per tensor (of the tensor's raw bytes), so a reader can verify a whole entry
or only the blocks it reads. A file that fails to parse or verify is removed and reported as a miss.
Files leave the tier in least-recently-used order when the budget needs room.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cache.entry import CacheEntry, EntryMeta
from cache.keys import CacheKey
from cache.metrics import CacheMetrics

logger = logging.getLogger(__name__)

FILE_SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
FILE_FORMAT_VERSION = "1"
# Bytes reserved for the safetensors header on top of the tensor bytes: 8-byte length prefix plus
# JSON of roughly 200 bytes per tensor (offsets, shape, dtype and its sha256 in the metadata).
_HEADER_BYTES_PER_TENSOR = 256
_HEADER_BYTES_BASE = 4096


class CorruptEntryError(Exception):
    """A disk file failed to parse or its checksums did not match."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Return the sha256 hex digest of a CPU tensor's raw bytes."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def _tensor_bytes(path: Path, file_size: int) -> int:
    """Return the bytes after the safetensors header: an 8-byte little-endian length, then JSON.

    A damaged length gives a wrong value here; reading the file then fails its checks.
    """
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
    return max(0, file_size - 8 - header_length)


def estimate_file_bytes(entry: CacheEntry) -> int:
    """Return an upper bound of the file size `DiskTier.write` produces for `entry`."""
    return entry.nbytes + _HEADER_BYTES_BASE + _HEADER_BYTES_PER_TENSOR * len(entry.tensors)


class DiskEntryReader:
    """Open handle on one disk entry that reads and verifies tensors on demand.

    Use it as a context manager. `read` raises CorruptEntryError on a checksum mismatch or a
    damaged file; the caller reports it to `DiskTier.discard`.
    """

    def __init__(self, path: Path, key: CacheKey) -> None:
        self.path = path
        self.key = key
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._handle.__enter__()
            metadata = self._handle.metadata() or {}
            self.meta = EntryMeta.from_strings(metadata)
            self._checksums: dict[str, str] = json.loads(metadata["sha256"])
            stored_key = metadata["key"]
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as error:
            raise CorruptEntryError(f"{path.name}: header is unreadable ({error})") from error
        if stored_key != key.canonical():
            raise CorruptEntryError(f"{path.name}: stored key does not match the requested key")
        names = set(self._handle.keys())
        if names != set(self._checksums):
            raise CorruptEntryError(f"{path.name}: tensor names differ from the checksum list")
        self.tensor_names: tuple[str, ...] = tuple(sorted(names))

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read and verify the named tensors."""
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            try:
                tensor = self._handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as error:
                raise CorruptEntryError(f"{self.path.name}: tensor {name!r} is unreadable ({error})") from error
            if tensor_sha256(tensor) != self._checksums[name]:
                raise CorruptEntryError(f"{self.path.name}: checksum mismatch in tensor {name!r}")
            tensors[name] = tensor
        return tensors

    def read_entry(self) -> CacheEntry:
        return CacheEntry(tensors=self.read(self.tensor_names), meta=self.meta)

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> DiskEntryReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DiskTier:
    """Entry files in `directory`, at most `budget_bytes` in total (reserved before each write)."""

    def __init__(self, directory: Path, budget_bytes: int, metrics: CacheMetrics | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"disk budget_bytes={budget_bytes} is invalid; pass 0 (disabled) or more.")
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.metrics = metrics or CacheMetrics()
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # digest -> file bytes, LRU first
        self._entry_nbytes: dict[str, int] = {}  # digest -> tensor bytes, the file minus its header
        self._used = 0
        self._reserved = 0
        # Digests whose files were evicted for room or discarded as corrupt since `take_evicted_digests` last ran.
        self._evicted: set[str] = set()
        self._writable = self._prepare_directory()
        self._update_gauges()

    # Queries ---------------------------------------------------------------------------------

    def contains(self, key: CacheKey) -> bool:
        return self.contains_digest(key.digest())

    def contains_digest(self, digest: str) -> bool:
        """Return True when the tier contains the entry whose key has this `CacheKey.digest()`."""
        with self._lock:
            return digest in self._files

    def entry_nbytes_of(self, key: CacheKey) -> int | None:
        """Return the tensor bytes of the key's entry (its size once read into memory), or None."""
        with self._lock:
            return self._entry_nbytes.get(key.digest())

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def entry_count(self) -> int:
        with self._lock:
            return len(self._files)

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return self._reserved

    def path_of(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest()}{FILE_SUFFIX}"

    # Writes ----------------------------------------------------------------------------------

    def write(self, key: CacheKey, entry: CacheEntry) -> bool:
        """Write `entry` atomically; returns False (and logs why) when it was not stored."""
        digest = key.digest()
        estimate = estimate_file_bytes(entry)
        if not self._writable:
            logger.warning("cache entry %s dropped: disk directory %s is not writable", digest[:12], self.directory)
            self.metrics.increment("editor_cache_rejections_total", tier="disk", reason="unwritable")
            return False
        if not self._reserve(digest, estimate):
            logger.warning(
                "cache entry %s dropped: %d bytes exceed the disk budget of %d bytes (EDITOR_CACHE_DISK_BYTES)",
                digest[:12], estimate, self.budget_bytes,
            )
            self.metrics.increment("editor_cache_rejections_total", tier="disk", reason="too_large")
            return False
        size = 0
        try:
            size = self._write_file(key, entry)
        except (OSError, SafetensorError) as error:
            logger.warning("cache entry %s dropped: writing to %s failed: %s", digest[:12], self.directory, error)
            self.metrics.increment("editor_cache_rejections_total", tier="disk", reason="write_failed")
        with self._lock:
            self._reserved -= estimate
            if size:
                self._files[digest] = size
                self._entry_nbytes[digest] = entry.nbytes
                self._used += size
        self._update_gauges()
        if size:
            self.metrics.key_placed(digest, "disk", size)
        return size > 0

    def _write_file(self, key: CacheKey, entry: CacheEntry) -> int:
        tensors = {name: tensor.contiguous() for name, tensor in entry.tensors.items()}
        metadata = entry.meta.to_strings()
        metadata["key"] = key.canonical()
        metadata["format"] = FILE_FORMAT_VERSION
        metadata["sha256"] = json.dumps({name: tensor_sha256(tensor) for name, tensor in tensors.items()})
        descriptor, temp_name = tempfile.mkstemp(
            prefix=f".{key.digest()}.", suffix=TEMP_SUFFIX, dir=self.directory
        )
        os.close(descriptor)
        try:
            save_file(tensors, temp_name, metadata=metadata)
            with open(temp_name, "rb") as handle:
                os.fsync(handle.fileno())
            # os.replace is atomic on POSIX: readers see the old file or the complete new one.
            os.replace(temp_name, self.path_of(key))
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return self.path_of(key).stat().st_size

    def _reserve(self, digest: str, size: int) -> bool:
        """Reserve `size` bytes, removing least recently used files (not `digest`) as needed."""
        removed: list[str] = []
        with self._lock:
            if size > self.budget_bytes:
                return False
            old_size = self._files.pop(digest, None)
            self._entry_nbytes.pop(digest, None)
            if old_size is not None:
                self._used -= old_size
                removed.append(digest)
            while self._used + self._reserved + size > self.budget_bytes and self._files:
                victim, victim_size = self._files.popitem(last=False)
                self._entry_nbytes.pop(victim, None)
                self._used -= victim_size
                removed.append(victim)
            fits = self._used + self._reserved + size <= self.budget_bytes
            if fits:
                self._reserved += size
            self._evicted.update(victim for victim in removed if victim != digest)
        for victim in removed:
            self._unlink(victim)
            if victim != digest:
                self.metrics.increment("editor_cache_evictions_total", tier="disk")
                self.metrics.key_placed(victim, None, 0)
        return fits

    # Reads -----------------------------------------------------------------------------------

    def open_reader(self, key: CacheKey) -> DiskEntryReader | None:
        """Open the entry's file for block reads; a damaged header is discarded and returns None."""
        digest = key.digest()
        with self._lock:
            if digest not in self._files:
                return None
            self._files.move_to_end(digest)
        try:
            return DiskEntryReader(self.path_of(key), key)
        except CorruptEntryError as error:
            self.discard(key, str(error))
            return None

    def read(self, key: CacheKey) -> CacheEntry | None:
        """Read and verify a whole entry; a damaged file is discarded and returns None."""
        reader = self.open_reader(key)
        if reader is None:
            return None
        started = time.perf_counter()
        try:
            with reader:
                entry = reader.read_entry()
        except CorruptEntryError as error:
            self.discard(key, str(error))
            return None
        self.metrics.observe_load(time.perf_counter() - started, "disk")
        return entry

    # Removal ---------------------------------------------------------------------------------

    def discard(self, key: CacheKey, reason: str) -> None:
        """Remove a file that failed validation and log a warning with the key digest."""
        digest = key.digest()
        logger.warning("cache file for key %s is corrupt and was removed: %s", digest, reason)
        self.metrics.increment("editor_cache_corrupt_files_total")
        if self.remove(key):
            with self._lock:
                self._evicted.add(digest)

    def take_evicted_digests(self) -> list[str]:
        """Return the digests whose files were evicted for room or discarded as corrupt since the last call."""
        with self._lock:
            digests = sorted(self._evicted)
            self._evicted.clear()
        return digests

    def remove(self, key: CacheKey) -> bool:
        return self.remove_digest(key.digest())

    def remove_digest(self, digest: str) -> bool:
        """Delete the file of the entry with this key digest; False when the tier did not hold it."""
        with self._lock:
            size = self._files.pop(digest, None)
            self._entry_nbytes.pop(digest, None)
            if size is not None:
                self._used -= size
        if size is None:
            return False
        self._unlink(digest)
        self.metrics.key_placed(digest, None, 0)
        self._update_gauges()
        return True

    def _unlink(self, digest: str) -> None:
        try:
            (self.directory / f"{digest}{FILE_SUFFIX}").unlink(missing_ok=True)
        except OSError as error:
            logger.warning("removing cache file %s failed: %s", digest[:12], error)

    # Startup ---------------------------------------------------------------------------------

    def _prepare_directory(self) -> bool:
        """Create the directory, delete leftover temp files and index existing entries, oldest first."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f".*{TEMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)
            found = sorted(self.directory.glob(f"*{FILE_SUFFIX}"), key=lambda path: path.stat().st_mtime)
        except OSError as error:
            logger.warning("cache directory %s is unusable, disk tier disabled: %s", self.directory, error)
            return False
        for path in found:
            try:
                size = path.stat().st_size
                entry_nbytes = _tensor_bytes(path, size)
            except OSError as error:
                logger.warning("cache file %s is unreadable and was skipped: %s", path.name, error)
                continue
            digest = path.name[: -len(FILE_SUFFIX)]
            self._files[digest] = size
            self._entry_nbytes[digest] = entry_nbytes
            self._used += size
        if not os.access(self.directory, os.W_OK):
            logger.warning("cache directory %s is not writable; existing files stay readable", self.directory)
            return False
        return True

    def _update_gauges(self) -> None:
        with self._lock:
            used, count = self._used, len(self._files)
        self.metrics.set_gauge("editor_cache_bytes", used, tier="disk")
        self.metrics.set_gauge("editor_cache_entries", count, tier="disk")
