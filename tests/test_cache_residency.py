"""Cache tiers of warm-up records after a worker restart, and dropping entries that nothing vouches for.

The worker-side functions run here against a real store in this process; the web side's drop messages are
captured instead of sent. `test_cache_residency_worker.py` runs both against real worker processes.
"""

from __future__ import annotations

import numpy as np
import pytest
from django.test import Client
from django.utils import timezone

from cache.compression import encoded_nbytes_of
from cache.testing import make_activations, make_key
from editing import fleet, services, warmups
from editing.models import CacheWarmup, JobStatus, Template
from editor_site import redis_keys
from editor_site.celery import app as celery_app
from tests.conftest import template_row
from workers import residency, template_cache, worker_state

pytestmark = pytest.mark.django_db

def activations(index: int):
    return make_activations(steps=2, blocks=2, tokens=16, channels=8, seed=index)


def entry_bytes() -> int:
    return encoded_nbytes_of(activations(0), "fp16")


HOST = "residency-test@h"
OTHER_HOST = "other-test@h"


@pytest.fixture
def small_store(monkeypatch, tmp_path):
    """A store of this process whose memory tier holds two test entries (LRU); the third spills the first to disk."""
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDITOR_CACHE_BYTES", str(2 * entry_bytes()))
    monkeypatch.setenv("EDITOR_CACHE_POLICY", "lru")
    template_cache.reset_store()
    yield template_cache.get_store()
    template_cache.reset_store()


def put(store, index: int) -> str:
    store.put_tensors(make_key(index), activations(index), steps=2, blocks=2)
    return make_key(index).digest()


def warmup_row(template: Template, digest: str, *, tier: str, worker: str = HOST, seed: int = 0,
               dropped: bool = False) -> CacheWarmup:
    return CacheWarmup.objects.create(
        template=template, seed=seed, steps=4, guidance=30.0, variant="kv", model="flux",
        status=JobStatus.SUCCEEDED, cache_key=digest, cache_bytes=1, cache_tier=tier, worker=worker,
        dropped_at=timezone.now() if dropped else None,
    )


def tier_of(row: CacheWarmup) -> str:
    return CacheWarmup.objects.get(pk=row.pk).cache_tier


def test_reconcile_reports_held_tiers(small_store, make_user):
    template = template_row(make_user())
    spilled, in_memory, also_in_memory = put(small_store, 0), put(small_store, 1), put(small_store, 2)
    assert small_store.tier_of_digest(spilled) == "disk"
    rows = {
        "memory": warmup_row(template, in_memory, tier="memory", seed=1),
        "spilled": warmup_row(template, spilled, tier="memory", seed=0),
        "gone": warmup_row(template, make_key(7).digest(), tier="memory", seed=7),
        "disk gone": warmup_row(template, make_key(8).digest(), tier="disk", seed=8),
        "other worker": warmup_row(template, make_key(9).digest(), tier="memory", worker=OTHER_HOST, seed=9),
    }

    counts = residency.reconcile_tiers(HOST)

    assert tier_of(rows["memory"]) == "memory"
    assert tier_of(rows["spilled"]) == "disk"
    assert tier_of(rows["gone"]) == "none"
    assert tier_of(rows["disk gone"]) == "none"
    assert tier_of(rows["other worker"]) == "memory"
    assert counts == {"disk": 1, "none": 2}
    resident = worker_state.snapshot()["resident"]
    token = worker_state.warmup_residency_token("flux", template.content_hash, 4, 0, 30.0)
    assert token in resident["disk"]
    assert small_store.tier_of_digest(also_in_memory) == "memory"


def test_reconcile_removes_dropped_entries(small_store, make_user):
    template = template_row(make_user())
    spilled = put(small_store, 0)
    put(small_store, 1)
    put(small_store, 2)
    path = small_store.disk.path_of(make_key(0))
    assert path.exists()
    row = warmup_row(template, spilled, tier="disk", dropped=True)

    residency.reconcile_tiers(HOST)

    assert tier_of(row) == "none"
    assert not path.exists()
