import threading
from pathlib import Path

import pytest

from cache.disk import DiskTier
from cache.policies import LruPolicy
from cache.prefetch import Prefetcher
from cache.store import ActivationStore
from cache.testing import make_activations, make_key


def spilled_store(tmp_path: Path) -> ActivationStore:
    """Return a store whose only entry, key 1, sits on disk."""
    disk = DiskTier(tmp_path, 1 << 22)
    tensors = make_activations(steps=1, blocks=2, tokens=16, channels=8)
    # A zero memory budget sends the put to disk; the returned store then has room for it.
    ActivationStore(0, LruPolicy(), disk=disk, codec="fp16").put_tensors(make_key(1), tensors, steps=1, blocks=2)
    return ActivationStore(1 << 20, LruPolicy(), disk=disk, codec="fp16")


def test_prefetch_promotes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = spilled_store(tmp_path)
    assert store.tier_of(make_key(1)) == "disk"
    release = threading.Event()
    calls: list[str] = []
    original_get = store.get

    def slow_get(key):
        calls.append(key.digest())
        release.wait()
        return original_get(key)

    monkeypatch.setattr(store, "get", slow_get)
    prefetcher = Prefetcher(store, max_workers=2)

    first = prefetcher.prefetch(make_key(1))
    second = prefetcher.prefetch(make_key(1))
    release.set()

    assert first is second
    assert first.result(timeout=30) is True
    prefetcher.close()
    assert calls == [make_key(1).digest()]
    assert store.tier_of(make_key(1)) == "memory"


def test_prefetch_resident_key_is_done(tmp_path: Path) -> None:
    store = spilled_store(tmp_path)
    store.get(make_key(1))
    prefetcher = Prefetcher(store)

    future = prefetcher.prefetch(make_key(1))

    assert future.done()
    assert future.result() is True
    assert prefetcher.in_flight() == 0
    prefetcher.close()


def test_prefetch_unknown_key_is_false(tmp_path: Path) -> None:
    prefetcher = Prefetcher(spilled_store(tmp_path))

    assert prefetcher.prefetch(make_key(99)).result() is False
    prefetcher.close()
