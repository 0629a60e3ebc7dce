import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from cache.compression import encode
from cache.disk import DiskTier
from cache.entry import CacheEntry, EntryMeta
from cache.loader import (
    BlockLoader,
    CacheLoadError,
    DiskBlockSource,
    EncodedBlockSource,
    MemoryBlockSource,
    open_block_source,
)
from cache.policies import LruPolicy
from cache.store import ActivationStore
from cache.testing import make_activations, make_key

STEPS, BLOCKS = 3, 4
ORDER = [(step, block) for step in range(STEPS) for block in range(BLOCKS)]


def activations() -> dict[str, torch.Tensor]:
    return make_activations(steps=STEPS, blocks=BLOCKS, tokens=8, channels=16, seed=5)


def memory_entry(codec: str = "fp32") -> CacheEntry:
    meta = EntryMeta(steps=STEPS, blocks=BLOCKS, codec=codec, source_dtype="float32")
    return CacheEntry(encode(activations(), codec), meta)


def test_loader_delivers_blocks_in_order() -> None:
    expected = activations()

    with BlockLoader(MemoryBlockSource(memory_entry()), ORDER, depth=2) as loader:
        for step, block in ORDER:
            loaded = loader.get(step, block)
            assert (loaded.step, loaded.block) == (step, block)
            assert sorted(loaded.tensors) == [f"s{step:03d}.b{block:02d}.k", f"s{step:03d}.b{block:02d}.v"]
            for name, tensor in loaded.tensors.items():
                assert torch.equal(tensor, expected[name])


def test_loader_reads_within_depth() -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    positions = {block_id: index for index, block_id in enumerate(ORDER)}

    class RecordingSource(MemoryBlockSource):
        def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
            step, block = int(names[0][1:4]), int(names[0][6:8])
            with lock:
                events.append(("read", positions[(step, block)]))
            return super().read(names)

    depth = 2
    with BlockLoader(RecordingSource(memory_entry()), ORDER, depth=depth) as loader:
        for step, block in ORDER:
            with lock:
                events.append(("request", positions[(step, block)]))
            loader.get(step, block)

    # Read i may start only after block i - depth was requested (taken off the queue).
    for index, (kind, position) in enumerate(events):
        if kind == "read" and position >= depth:
            assert ("request", position - depth) in events[:index]
    assert sorted(position for kind, position in events if kind == "read") == list(range(len(ORDER)))


def test_loader_surfaces_read_error() -> None:
    class FailingSource(MemoryBlockSource):
        def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
            if names[0].startswith("s000.b02."):
                raise OSError("simulated read failure")
            return super().read(names)

    with BlockLoader(FailingSource(memory_entry()), ORDER, depth=2) as loader:
        loader.get(0, 0)
        loader.get(0, 1)
        with pytest.raises(CacheLoadError, match="simulated read failure"):
            loader.get(0, 2)


def test_loader_skips_unrequested_blocks() -> None:
    with BlockLoader(MemoryBlockSource(memory_entry()), ORDER, depth=1) as loader:
        assert loader.get(1, 0).step == 1
        with pytest.raises(KeyError, match="in order"):
            loader.get(0, 3)
        assert loader.get(1, 1).block == 1


def test_loader_rejects_unplanned_block() -> None:
    with BlockLoader(MemoryBlockSource(memory_entry()), ORDER[:2], depth=1) as loader:
        with pytest.raises(KeyError, match="not in this loader"):
            loader.get(2, 3)


def test_loader_reports_missing_block() -> None:
    with BlockLoader(MemoryBlockSource(memory_entry()), [(0, 0), (9, 9)], depth=1) as loader:
        loader.get(0, 0)
        with pytest.raises(CacheLoadError, match="step 9 block 9"):
            loader.get(9, 9)


def disk_store(tmp_path: Path) -> ActivationStore:
    disk = DiskTier(tmp_path / "disk", 1 << 24)
    return ActivationStore(0, LruPolicy(), disk=disk, codec="int8")


def test_loader_streams_from_disk(tmp_path: Path) -> None:
    store = disk_store(tmp_path)
    key = make_key(1)
    assert store.put_tensors(key, activations(), steps=STEPS, blocks=BLOCKS) == "disk"
    expected = activations()

    source = open_block_source(store, key)
    assert isinstance(source, DiskBlockSource)
    with BlockLoader(source, ORDER, depth=3) as loader:
        for step, block in ORDER:
            for name, tensor in loader.get(step, block).tensors.items():
                assert torch.allclose(tensor, expected[name], atol=expected[name].abs().max().item() / 100)
    assert store.stats().resident_bytes == 0


def test_loader_corrupt_disk_block_fails(tmp_path: Path) -> None:
    store = disk_store(tmp_path)
    key = make_key(2)
    store.put_tensors(key, activations(), steps=STEPS, blocks=BLOCKS)
    path = store.disk.path_of(key)  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last tensor body in the file, one of the last block's tensors
    path.write_bytes(bytes(data))

    source = open_block_source(store, key)
    assert source is not None
    with BlockLoader(source, ORDER, depth=2) as loader:
        with pytest.raises(CacheLoadError, match="checksum"):
            for step, block in ORDER:
                loader.get(step, block)
    assert store.tier_of(key) is None
    assert not path.exists()


def test_open_block_source_prefers_memory(tmp_path: Path) -> None:
    store = ActivationStore(1 << 20, LruPolicy(), codec="fp16")
    store.put_tensors(make_key(3), activations(), steps=STEPS, blocks=BLOCKS)

    assert isinstance(open_block_source(store, make_key(3)), MemoryBlockSource)
    assert open_block_source(store, make_key(4)) is None


def test_loader_rejects_cuda_without_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present; the CPU-only error path does not apply")
    with pytest.raises(ValueError, match="CUDA is not available"):
        BlockLoader(MemoryBlockSource(memory_entry()), ORDER, device="cuda")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_cuda_matches_cpu(open_source: Callable[[], EncodedBlockSource], depth: int) -> None:
    with BlockLoader(open_source(), ORDER, depth=depth) as loader:
        on_cpu = {(step, block): loader.get(step, block).tensors for step, block in ORDER}

    with BlockLoader(open_source(), ORDER, device="cuda", depth=depth) as loader:
        for step, block in ORDER:
            for name, tensor in loader.get(step, block).tensors.items():
                assert tensor.device.type == "cuda"
                # Compute on the current stream right away: it must see the finished copy.
                torch.testing.assert_close((tensor * 1).cpu(), on_cpu[(step, block)][name], rtol=1e-6, atol=0)


@needs_cuda
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_loader_cuda_matches_cpu(codec: str) -> None:
    assert_cuda_matches_cpu(lambda: MemoryBlockSource(memory_entry(codec)), depth=2)


@needs_cuda
def test_loader_cuda_streams_from_disk(tmp_path: Path) -> None:
    store = disk_store(tmp_path)
    key = make_key(7)
    assert store.put_tensors(key, activations(), steps=STEPS, blocks=BLOCKS) == "disk"

    def open_disk() -> EncodedBlockSource:
        source = open_block_source(store, key)
        assert isinstance(source, DiskBlockSource)
        return source

    assert_cuda_matches_cpu(open_disk, depth=3)
