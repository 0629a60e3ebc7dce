import logging
import random
import threading
from pathlib import Path

import pytest
import torch

from cache.compression import encoded_nbytes_of
from cache.disk import DiskTier
from cache.policies import LruPolicy, WTinyLfuPolicy
from cache.store import ActivationStore
from cache.testing import make_activations, make_key


def activations(tokens: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_activations(steps=2, blocks=2, tokens=tokens, channels=8, seed=seed)


def entry_bytes(tokens: int = 16) -> int:
    return encoded_nbytes_of(activations(tokens), "fp16")


def make_store(tmp_path: Path, entries: int, *, disk: bool = True) -> ActivationStore:
    budget = entries * entry_bytes()
    tier = DiskTier(tmp_path / "disk", 1 << 24) if disk else None
    return ActivationStore(budget, LruPolicy(), disk=tier, codec="fp16")


def test_store_put_then_get(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=2)
    key = make_key(1)

    assert store.put_tensors(key, activations(), steps=2, blocks=2) == "memory"
    entry = store.get(key)

    assert entry is not None
    assert store.tier_of(key) == "memory"
    assert torch.allclose(entry.decode("s001.b01.k"), activations()["s001.b01.k"], rtol=1e-3, atol=1e-2)


def test_store_miss_returns_none(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=2)

    assert store.get(make_key(9)) is None
    assert store.tier_of(make_key(9)) is None
    assert store.stats().misses == 1


def test_store_spills_and_promotes(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=2)
    for index in range(3):
        store.put_tensors(make_key(index), activations(seed=index), steps=2, blocks=2)

    assert store.tier_of(make_key(0)) == "disk"
    assert store.stats().evictions == 1

    entry = store.get(make_key(0))

    assert entry is not None
    assert store.tier_of(make_key(0)) == "memory"
    assert store.tier_of(make_key(1)) == "disk"
    assert store.stats().disk_hits == 1
    assert torch.allclose(entry.decode("s000.b00.v"), activations(seed=0)["s000.b00.v"], rtol=1e-3, atol=1e-2)


def test_store_without_disk_drops_victims(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=1, disk=False)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)
    store.put_tensors(make_key(1), activations(), steps=2, blocks=2)

    assert store.tier_of(make_key(0)) is None
    assert store.get(make_key(0)) is None


def test_store_oversized_entry_goes_to_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make_store(tmp_path, entries=1)
    key = make_key(1)

    with caplog.at_level(logging.INFO, logger="cache.store"):
        tier = store.put_tensors(key, activations(tokens=64), steps=2, blocks=2)

    assert tier == "disk"
    assert key.short() in caplog.text
    assert store.stats().resident_bytes == 0
    assert store.get(key) is None  # larger than memory: read it through open_disk_reader
    reader = store.open_disk_reader(key)
    assert reader is not None
    reader.close()


def test_store_drop_removes_every_tier(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=1)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)
    store.put_tensors(make_key(1), activations(), steps=2, blocks=2)

    assert store.drop(make_key(0))
    assert store.drop(make_key(1))
    assert store.tier_of(make_key(0)) is None
    assert store.tier_of(make_key(1)) is None
    assert store.stats().resident_bytes == 0


def test_store_write_through_outlives_the_store(tmp_path: Path) -> None:
    budget = 2 * entry_bytes()
    store = ActivationStore(budget, LruPolicy(), disk=DiskTier(tmp_path / "disk", 1 << 24), write_through=True)
    key = make_key(0)

    assert store.put_tensors(key, activations(), steps=2, blocks=2) == "memory"
    assert store.tier_of(key) == "memory"
    assert store.disk.path_of(key).exists()
    assert {row.digest: row.tier for row in store.metrics.key_summaries()}[key.digest()] == "memory"

    # A new process's store on the same folder finds the entry on disk.
    restarted = ActivationStore(budget, LruPolicy(), disk=DiskTier(tmp_path / "disk", 1 << 24), write_through=True)
    assert restarted.tier_of(key) == "disk"
    entry = restarted.get(key)
    assert entry is not None
    assert torch.allclose(entry.decode("s001.b01.k"), activations()["s001.b01.k"], rtol=1e-3, atol=1e-2)

    assert restarted.drop(key)
    assert not restarted.disk.path_of(key).exists()


def test_store_without_write_through_keeps_disk_empty(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=2)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)

    assert store.tier_of(make_key(0)) == "memory"
    assert not store.disk.path_of(make_key(0)).exists()


def test_store_drop_by_digest_deletes_file(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=1)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)
    store.put_tensors(make_key(1), activations(), steps=2, blocks=2)
    spilled = make_key(0).digest()
    path = store.disk.path_of(make_key(0))
    assert store.tier_of_digest(spilled) == "disk"
    assert store.tier_of_digest(make_key(1).digest()) == "memory"
    assert path.exists()

    assert store.drop_digest(spilled)
    assert store.drop_digest(make_key(1).digest())

    assert not path.exists()
    assert store.tier_of_digest(spilled) is None
    assert store.tier_of_digest(make_key(1).digest()) is None
    assert not store.drop_digest(spilled)


def test_store_keys_differing_in_one_field_never_match(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=4)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)

    for variant in (make_key(0, steps=20), make_key(0, seed=1), make_key(0, width=768), make_key(0, model_id="m2")):
        assert store.get(variant) is None


def test_store_budget_holds_under_threads(tmp_path: Path) -> None:
    sizes = [8, 16, 32, 48]
    budget = 3 * entry_bytes(48)
    disk = DiskTier(tmp_path / "disk", 1 << 26)
    store = ActivationStore(budget, WTinyLfuPolicy(budget), disk=disk, codec="fp16")
    observed: list[int] = []
    original_check = store._check_budget

    def instrumented_check() -> None:
        # Runs under the store lock at every accounting change.
        observed.append(store._resident + store._reserved)
        original_check()

    store._check_budget = instrumented_check  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                index = rng.randrange(12)
                key = make_key(index)
                if rng.random() < 0.5:
                    tokens = sizes[index % len(sizes)]
                    store.put_tensors(key, activations(tokens, seed=index), steps=2, blocks=2)
                else:
                    store.get(key)
        except BaseException as error:  # collected so the main thread can fail the test
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stats = store.stats()
    assert errors == []
    assert len(observed) > 100
    assert max(observed) <= budget
    assert stats.peak_bytes <= budget
    assert stats.reserved_bytes == 0
    assert stats.evictions > 0
    assert stats.resident_bytes == sum(entry.nbytes for _, entry in store._entries.values())


def test_store_resident_bytes_match_entries(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=3)
    for index in range(6):
        store.put_tensors(make_key(index), activations(seed=index), steps=2, blocks=2)
        store.get(make_key(index // 2))

    expected = sum(
        store.get(make_key(index)).nbytes  # type: ignore[union-attr]
        for index in range(6)
        if store.tier_of(make_key(index)) == "memory"
    )
    assert store.stats().resident_bytes <= store.budget_bytes
    assert store.stats().resident_bytes == expected


def test_store_corrupt_spill_is_miss(tmp_path: Path) -> None:
    store = make_store(tmp_path, entries=1)
    store.put_tensors(make_key(0), activations(), steps=2, blocks=2)
    store.put_tensors(make_key(1), activations(), steps=2, blocks=2)
    path = store.disk.path_of(make_key(0))  # type: ignore[union-attr]
    path.write_bytes(path.read_bytes()[:-7])

    assert store.get(make_key(0)) is None
    assert store.tier_of(make_key(0)) is None
    assert not path.exists()
    assert store.stats().misses == 1
    assert store.stats().reserved_bytes == 0
