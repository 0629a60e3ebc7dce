"""Overlapped block loading: cached activations arrive ahead of the compute that needs them.

`BlockLoader` walks a fixed order of (step, block) pairs on a background thread and keeps at
most `depth` decoded blocks waiting. On CPU the thread reads (from memory or a disk file),
verifies and decodes. On CUDA it also stages the encoded tensors in pinned host buffers, copies
them on a separate `torch.cuda.Stream` and records one `torch.cuda.Event` per block. `get` then
makes the compute stream wait on that event, so the host does not block on the copy.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import torch

from cache.compression import Codec, decode
from cache.disk import CorruptEntryError, DiskEntryReader, DiskTier
from cache.entry import CacheEntry
from cache.keys import CacheKey
from cache.metrics import CacheMetrics
from cache.store import ActivationStore

logger = logging.getLogger(__name__)

_BLOCK_NAME = re.compile(r"^s(\d+)\.b(\d+)\.")

BlockId = tuple[int, int]


class CacheLoadError(RuntimeError):
    """Loading a cached block failed; the masked engine should fall back to full compute."""


@dataclass(frozen=True)
class BlockTensors:
    """Decoded tensors of one step and block, keyed by full name (e.g. "s003.b05.k")."""

    step: int
    block: int
    tensors: Mapping[str, torch.Tensor]


class BlockCacheSource(Protocol):
    """Protocol through which the masked engine reads cached activations."""

    def get(self, step: int, block: int) -> BlockTensors: ...


class EncodedBlockSource(Protocol):
    """Encoded tensors of one entry, read one block at a time."""

    codec: Codec
    dtype: torch.dtype

    def block_names(self, step: int, block: int) -> list[str]: ...

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


def index_block_names(names: Sequence[str]) -> dict[BlockId, list[str]]:
    """Group tensor names (scales included) by the (step, block) their "sSSS.bBB." prefix names."""
    index: dict[BlockId, list[str]] = {}
    for name in names:
        match = _BLOCK_NAME.match(name)
        if match is not None:
            index.setdefault((int(match[1]), int(match[2])), []).append(name)
    return index


class MemoryBlockSource:
    """Blocks of an entry that is resident in host memory."""

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry
        self.codec = entry.meta.codec
        self.dtype = entry.meta.torch_dtype
        self._index = index_block_names(list(entry.tensors))

    def block_names(self, step: int, block: int) -> list[str]:
        return self._index.get((step, block), [])

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: self.entry.tensors[name] for name in names}

    def close(self) -> None:
        pass


class DiskBlockSource:
    """Blocks read straight from a disk file; a checksum failure removes the file from the tier."""

    def __init__(self, disk: DiskTier, key: CacheKey, reader: DiskEntryReader) -> None:
        self.disk = disk
        self.key = key
        self.reader = reader
        self.codec = reader.meta.codec
        self.dtype = reader.meta.torch_dtype
        self._index = index_block_names(reader.tensor_names)

    def block_names(self, step: int, block: int) -> list[str]:
        return self._index.get((step, block), [])

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        try:
            return self.reader.read(names)
        except CorruptEntryError as error:
            self.disk.discard(self.key, str(error))
            raise

    def close(self) -> None:
        self.reader.close()


def open_block_source(store: ActivationStore, key: CacheKey) -> MemoryBlockSource | DiskBlockSource | None:
    """Return a block source for `key` from memory if resident, else streamed from disk, else None.

    A disk entry is streamed without promotion, so it never takes memory-tier budget.
    """
    if store.tier_of(key) == "memory":
        entry = store.get(key)
        if entry is not None:
            return MemoryBlockSource(entry)
    if store.disk is None:
        return None
    reader = store.disk.open_reader(key)
    if reader is None:
        return None
    return DiskBlockSource(store.disk, key, reader)


@dataclass
class LoaderTimings:
    """Seconds spent per block: `load` on the loader thread, `wait` by the consumer in `get`."""

    load: dict[BlockId, float] = field(default_factory=dict)
    wait: dict[BlockId, float] = field(default_factory=dict)

    @property
    def total_wait_s(self) -> float:
        return sum(self.wait.values())


@dataclass
class _Ready:
    block: BlockTensors
    event: torch.cuda.Event | None


class BlockLoader:
    """Loads `order` ahead of compute, at most `depth` blocks waiting; implements BlockCacheSource.

    Blocks must be requested in `order`. Requesting a later block drops the earlier ones that
    were never requested. `device` is where the tensors end up ("cpu" or a CUDA device).
    """

    def __init__(
        self,
        source: EncodedBlockSource,
        order: Sequence[BlockId],
        *,
        device: torch.device | str = "cpu",
        depth: int = 4,
        metrics: CacheMetrics | None = None,
        close_source: bool = True,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} is invalid; pass at least 1 block.")
        if len(set(order)) != len(order):
            raise ValueError("order lists a (step, block) pair twice; pass each pair once.")
        self.source = source
        self.order = list(order)
        self.device = torch.device(device)
        self.depth = depth
        self.metrics = metrics
        self.timings = LoaderTimings()
        self._close_source = close_source
        self._position = {block_id: index for index, block_id in enumerate(self.order)}
        self._condition = threading.Condition()
        self._ready: dict[BlockId, _Ready] = {}
        self._consumed_until = 0  # order index of the next block the consumer may request
        self._produced = 0
        self._error: BaseException | None = None
        self._stop = False
        self._use_cuda = self.device.type == "cuda"
        if self._use_cuda and not torch.cuda.is_available():
            raise ValueError(f"device={self.device} requested but CUDA is not available; pass device='cpu'.")
        self._copy_stream = torch.cuda.Stream(self.device) if self._use_cuda else None
        self._pinned_slots: list[tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = []
        self._thread = threading.Thread(target=self._run, name="cache-block-loader", daemon=True)
        self._thread.start()

    # Consumer side ---------------------------------------------------------------------------

    def get(self, step: int, block: int) -> BlockTensors:
        """Block until (step, block) is loaded and return it; raises CacheLoadError if loading failed."""
        block_id = (step, block)
        position = self._position.get(block_id)
        if position is None:
            raise KeyError(f"block {block_id} is not in this loader's order; plan it before loading.")
        started = time.perf_counter()
        with self._condition:
            if position < self._consumed_until:
                raise KeyError(f"block {block_id} was already requested or skipped; request blocks in order.")
            # Drop earlier blocks the consumer skipped, so they stop holding queue slots.
            for skipped in self.order[self._consumed_until : position]:
                self._ready.pop(skipped, None)
            self._consumed_until = position
            self._condition.notify_all()
            while block_id not in self._ready:
                if self._error is not None and self._produced <= position:
                    raise CacheLoadError(f"loading cached block {block_id} failed: {self._error}") from self._error
                if self._stop:
                    raise CacheLoadError(f"loader closed before block {block_id} was loaded")
                self._condition.wait()
            ready = self._ready.pop(block_id)
            self._consumed_until = position + 1
            self._condition.notify_all()
        if ready.event is not None:
            # The compute stream waits on the copy; the host does not block.
            compute_stream = torch.cuda.current_stream(self.device)
            compute_stream.wait_event(ready.event)
            for tensor in ready.block.tensors.values():
                tensor.record_stream(compute_stream)
        self.timings.wait[block_id] = time.perf_counter() - started
        return ready.block

    def close(self) -> None:
        """Stop the loader thread and release the source; safe to call twice."""
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        self._thread.join()
        if self._close_source:
            self.source.close()

    def __enter__(self) -> BlockLoader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Loader thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for index, block_id in enumerate(self.order):
                with self._condition:
                    # Wait for a free slot: at most `depth` loaded blocks ahead of the consumer.
                    while not self._stop and index >= self._consumed_until + self.depth:
                        self._condition.wait()
                    if self._stop:
                        return
                    if index < self._consumed_until:
                        self._produced = index + 1
                        continue  # skipped by the consumer
                started = time.perf_counter()
                ready = self._load(block_id, index)
                elapsed = time.perf_counter() - started
                self.timings.load[block_id] = elapsed
                if self.metrics is not None:
                    self.metrics.observe_load(elapsed, "block")
                with self._condition:
                    if index >= self._consumed_until:
                        self._ready[block_id] = ready
                    self._produced = index + 1
                    self._condition.notify_all()
        except BaseException as error:  # surfaced to the consumer by get()
            logger.warning("cache block loader failed: %s", error)
            with self._condition:
                self._error = error
                self._condition.notify_all()

    def _load(self, block_id: BlockId, index: int) -> _Ready:
        step, block = block_id
        names = self.source.block_names(step, block)
        if not names:
            raise CacheLoadError(f"the cached entry has no tensors for step {step} block {block}")
        encoded = self.source.read(names)
        if not self._use_cuda:
            return _Ready(BlockTensors(step, block, decode(encoded, self.source.codec, self.source.dtype)), None)
        return self._load_cuda(step, block, encoded, index)

    def _load_cuda(self, step: int, block: int, encoded: dict[str, torch.Tensor], index: int) -> _Ready:
        # A ring of depth + 1 pinned slots: slot i is reused only after its previous copy finished.
        # NOTE: this path needs a CUDA device, so its tests in tests/test_cache_loader.py skip without one.
        slot_index = index % (self.depth + 1)
        while len(self._pinned_slots) <= slot_index:
            self._pinned_slots.append(({}, None))
        buffers, previous_event = self._pinned_slots[slot_index]
        if previous_event is not None:
            previous_event.synchronize()
        staged: dict[str, torch.Tensor] = {}
        for name, tensor in encoded.items():
            buffer = buffers.get(name.split(".", 2)[-1])
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffers[name.split(".", 2)[-1]] = buffer
            buffer.copy_(tensor)
            staged[name] = buffer
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            on_device = {name: buffer.to(self.device, non_blocking=True) for name, buffer in staged.items()}
            decoded = decode(on_device, self.source.codec, self.source.dtype)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._pinned_slots[slot_index] = (buffers, event)
        return _Ready(BlockTensors(step, block, decoded), event)

