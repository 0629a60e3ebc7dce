"""Cache tiers of warm-up records after a worker restart, and dropping entries that nothing vouches for.

The worker-side functions run here against a real store in this process; the web side's drop messages are
captured instead of sent. `test_cache_residency_worker.py` runs both against real worker processes.
"""

from __future__ import annotations

import numpy as np
import pytest
from django.test import Client
from django.utils import timezone

from cache.compression import encode, encoded_nbytes_of
from cache.disk import estimate_file_bytes
from cache.entry import CacheEntry, EntryMeta
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
    """A store of this process whose memory tier has room for two test entries (LRU); the third spills the first to disk."""
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


def test_evictions_move_records_after_job(small_store, make_user, monkeypatch):
    template = template_row(make_user())
    first = put(small_store, 0)
    rows = {
        "first": warmup_row(template, first, tier="memory", seed=0),
        "second": warmup_row(template, put(small_store, 1), tier="memory", seed=1),
    }
    assert residency.record_evictions(HOST) == {}

    put(small_store, 2)  # evicts the least recently used entry, the first, to disk

    assert residency.record_evictions(HOST) == {"disk": 1}
    assert tier_of(rows["first"]) == "disk"
    assert tier_of(rows["second"]) == "memory"
    assert residency.record_evictions(HOST) == {}

    # Without a disk tier an evicted entry is gone.
    monkeypatch.setattr(small_store, "disk", None)
    put(small_store, 3)
    assert residency.record_evictions(HOST) == {"none": 1}
    assert tier_of(rows["second"]) == "none"


def test_disk_evictions_move_records_after_job(small_store, make_user, monkeypatch):
    template = template_row(make_user())
    monkeypatch.setattr(small_store, "write_through", False)
    first, second = put(small_store, 0), put(small_store, 1)
    rows = {"first": warmup_row(template, first, tier="memory", seed=0),
            "second": warmup_row(template, second, tier="memory", seed=1)}
    put(small_store, 2)  # spills the first entry to disk
    assert residency.record_evictions(HOST) == {"disk": 1}
    # Room on disk for one file: the next spill (the second) evicts the first's file. A write reserves
    # the file's upper bound, which is larger than the file it writes.
    meta = EntryMeta(steps=2, blocks=2, codec="fp16", source_dtype="float32")
    upper_bound = estimate_file_bytes(CacheEntry(encode(activations(1), "fp16"), meta))
    monkeypatch.setattr(small_store.disk, "budget_bytes", small_store.disk.used_bytes + upper_bound - 1)

    put(small_store, 3)

    assert small_store.tier_of_digest(first) is None
    assert residency.record_evictions(HOST) == {"disk": 1, "none": 1}
    assert tier_of(rows["first"]) == "none"
    assert tier_of(rows["second"]) == "disk"

    # A file found corrupt on read is gone too.
    small_store.disk.discard(make_key(1), "test damage")
    assert residency.record_evictions(HOST) == {"none": 1}
    assert tier_of(rows["second"]) == "none"


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


def test_drop_entries_keeps_vouched_ones(small_store, make_user, redis_url):
    template = template_row(make_user())
    spilled, in_memory, vouched = put(small_store, 0), put(small_store, 1), put(small_store, 2)
    dropped_row = warmup_row(template, in_memory, tier="memory", dropped=True)
    kept_row = warmup_row(template, vouched, tier="memory", seed=2)
    path = small_store.disk.path_of(make_key(0))

    try:
        removed = residency.drop_entries(HOST, [spilled, in_memory, vouched, make_key(5).digest()])
    finally:
        redis_keys.client().delete(redis_keys.worker_load_key(HOST), redis_keys.worker_metrics_key(HOST))

    assert removed == sorted([spilled, in_memory])
    assert not path.exists()
    assert small_store.tier_of_digest(spilled) is None
    assert small_store.tier_of_digest(in_memory) is None
    assert small_store.tier_of_digest(vouched) == "memory"
    assert tier_of(dropped_row) == "none"
    assert tier_of(kept_row) == "memory"


@pytest.fixture
def sent_drops(monkeypatch, settings):
    """The drop messages the web side sends, as (queue, digests), to two live workers."""
    settings.EDITOR_WARMUP_ON_CREATE = False
    sent: list[tuple[str, list[str]]] = []
    workers = [fleet.WorkerState("a@h", ("flux",), ()), fleet.WorkerState("b@h", ("flux",), ())]
    monkeypatch.setattr(fleet, "live_workers", lambda: workers)
    monkeypatch.setattr(celery_app.conf, "broker_url", "redis://127.0.0.1:6379/15")

    def send_task(name, args=None, queue=None, **_kwargs):
        assert name == warmups.DROP_CACHE_ENTRIES_TASK
        sent.append((queue, args[0]))

    monkeypatch.setattr(celery_app, "send_task", send_task)
    return sent


def shared_pair(owner, image) -> tuple[Template, Template]:
    first = services.create_template(owner=owner, name="first", image=image)
    second = services.create_template(owner=owner, name="second", image=image)
    return first, second


def test_delete_sends_keys_of_last_template(sent_drops, make_user, media_root, django_capture_on_commit_callbacks):
    owner = make_user()
    first, second = shared_pair(owner, np.full((32, 32, 3), 90, dtype=np.uint8))
    shared, own = make_key(0).digest(), make_key(1).digest()
    warmup_row(first, shared, tier="memory")
    warmup_row(first, own, tier="memory", seed=1)
    warmup_row(second, shared, tier="memory")

    with django_capture_on_commit_callbacks(execute=True):
        first.delete()

    # The shared entry stays while the second template's warm-up vouches for it.
    assert sent_drops == [("edit.direct.a@h", [own]), ("edit.direct.b@h", [own])]

    sent_drops.clear()
    with django_capture_on_commit_callbacks(execute=True):
        second.delete()

    assert sent_drops == [("edit.direct.a@h", [shared]), ("edit.direct.b@h", [shared])]


def test_api_and_admin_delete_send_drops(sent_drops, make_user, admin_user, api_client_for, media_root,
                                         django_capture_on_commit_callbacks):
    owner = make_user("alice")
    by_api, by_admin = template_row(owner, "api"), template_row(owner, "admin")
    warmup_row(by_api, make_key(0).digest(), tier="memory")
    by_admin.content_hash = "1" * 64
    by_admin.save()
    warmup_row(by_admin, make_key(1).digest(), tier="disk")
    client = api_client_for("bob")
    client.force_authenticate(owner)
    admin = Client()
    admin.force_login(admin_user)

    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/api/templates/{by_api.pk}/").status_code == 204
    with django_capture_on_commit_callbacks(execute=True):
        response = admin.post(
            "/admin/editing/template/",
            {"action": "delete_selected", "_selected_action": [by_admin.pk], "post": "yes"},
        )

    assert response.status_code == 302
    assert [digests for queue, digests in sent_drops if queue == "edit.direct.a@h"] == [
        [make_key(0).digest()], [make_key(1).digest()],
    ]


def test_drop_cache_sends_drops(sent_drops, make_user, django_capture_on_commit_callbacks):
    template = template_row(make_user())
    warmup_row(template, make_key(0).digest(), tier="memory")

    with django_capture_on_commit_callbacks(execute=True):
        assert warmups.drop_cache(template) == 1

    assert sorted(sent_drops) == [("edit.direct.a@h", [make_key(0).digest()]),
                                  ("edit.direct.b@h", [make_key(0).digest()])]


def test_admin_drop_reports_removal(sent_drops, admin_user, django_capture_on_commit_callbacks):
    from django.contrib.admin.sites import site
    from django.contrib.messages.storage.fallback import FallbackStorage
    from django.test import RequestFactory

    template = template_row(admin_user)
    warmup_row(template, make_key(0).digest(), tier="memory")
    request = RequestFactory().post("/admin/editing/template/")
    request.user = admin_user
    request.session = {}
    request._messages = FallbackStorage(request)

    with django_capture_on_commit_callbacks(execute=True):
        site._registry[Template].drop_cache(request, Template.objects.filter(pk=template.pk))

    message = str(list(request._messages)[0])
    assert "Dropped 1 cached warm-up" in message
    assert "live workers remove its entry now" in message
    assert len(sent_drops) == 2


def test_delete_without_warmups_sends_nothing(sent_drops, make_user, django_capture_on_commit_callbacks):
    template = template_row(make_user())

    with django_capture_on_commit_callbacks(execute=True):
        template.delete()

    assert sent_drops == []
