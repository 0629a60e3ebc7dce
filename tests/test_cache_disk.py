import logging
from pathlib import Path

import pytest
import torch

import cache.disk
from cache.compression import encode
from cache.disk import DiskTier, estimate_file_bytes
from cache.entry import CacheEntry, EntryMeta
from cache.testing import make_activations, make_key


def make_entry(seed: int = 0, tokens: int = 16) -> CacheEntry:
    tensors = make_activations(steps=2, blocks=2, tokens=tokens, channels=8, seed=seed)
    return CacheEntry(encode(tensors, "fp16"), EntryMeta(steps=2, blocks=2, codec="fp16", source_dtype="float32"))


def test_disk_round_trip(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 20)
    key, entry = make_key(1), make_entry()

    assert disk.write(key, entry)
    loaded = disk.read(key)

    assert loaded is not None
    assert loaded.meta == entry.meta
    assert set(loaded.tensors) == set(entry.tensors)
    for name, tensor in entry.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)


def test_disk_leaves_no_temp_files(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 20)
    disk.write(make_key(1), make_entry())

    assert [path.name for path in tmp_path.iterdir()] == [f"{make_key(1).digest()}.safetensors"]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [flip_last_byte, truncate_half, overwrite_header])
def test_disk_damaged_file_is_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage) -> None:
    disk = DiskTier(tmp_path, 1 << 20)
    key = make_key(2)
    disk.write(key, make_entry())
    damage(disk.path_of(key))

    with caplog.at_level(logging.WARNING, logger="cache.disk"):
        assert disk.read(key) is None

    assert not disk.path_of(key).exists()
    assert not disk.contains(key)
    assert disk.used_bytes == 0
    assert key.digest() in caplog.text
    assert disk.metrics.counter("editor_cache_corrupt_files_total") == 1


def test_disk_file_of_other_key_is_rejected(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 20)
    disk.write(make_key(3), make_entry())
    disk.path_of(make_key(3)).rename(disk.path_of(make_key(4)))
    reopened = DiskTier(tmp_path, 1 << 20)

    assert reopened.read(make_key(4)) is None
    assert not disk.path_of(make_key(4)).exists()


def test_disk_evicts_least_recently_used(tmp_path: Path) -> None:
    entry = make_entry()
    probe = DiskTier(tmp_path / "probe", 1 << 20)
    probe.write(make_key(1), entry)
    # Room for one file plus one write reservation: the third write must evict one file.
    budget = probe.used_bytes + estimate_file_bytes(entry)
    disk = DiskTier(tmp_path / "tier", budget)
    disk.write(make_key(1), entry)
    disk.write(make_key(2), entry)
    disk.read(make_key(1))
    disk.write(make_key(3), entry)

    assert disk.contains(make_key(1))
    assert not disk.contains(make_key(2))
    assert disk.contains(make_key(3))
    assert disk.used_bytes <= budget


def test_disk_rejects_entry_over_budget(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1024)

    assert not disk.write(make_key(1), make_entry(tokens=64))
    assert disk.used_bytes == 0


def test_disk_reindexes_existing_files(tmp_path: Path) -> None:
    DiskTier(tmp_path, 1 << 20).write(make_key(5), make_entry())
    (tmp_path / ".leftover.tmp").write_bytes(b"partial")

    reopened = DiskTier(tmp_path, 1 << 20)

    assert reopened.contains(make_key(5))
    assert reopened.read(make_key(5)) is not None
    assert not (tmp_path / ".leftover.tmp").exists()


def test_disk_full_drops_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def fail_write(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    disk = DiskTier(tmp_path, 1 << 20)
    monkeypatch.setattr(cache.disk, "save_file", fail_write)

    with caplog.at_level(logging.WARNING, logger="cache.disk"):
        assert not disk.write(make_key(1), make_entry())

    assert "No space left" in caplog.text
    assert disk.reserved_bytes == 0
    assert list(tmp_path.iterdir()) == []


def test_disk_unusable_directory_drops_entry(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    disk = DiskTier(blocker / "cache", 1 << 20)

    assert not disk.write(make_key(1), make_entry())
    assert disk.read(make_key(1)) is None
