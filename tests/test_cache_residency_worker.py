"""Cache tiers and drops against a real Celery worker process that restarts under the same name."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from editing import catalog, services, warmups
from editing.models import CacheWarmup, JobStatus, Template
from editor_site.stack import worker_command
from tests.conftest import running_worker

pytestmark = pytest.mark.django_db(transaction=True)

# A queue only this module's worker consumes, so the shared test worker never runs these warm-ups.
QUEUE = "edit.residency"
TIMEOUT_S = 120
STEPS = 2


def warm(template: Template, seed: int) -> CacheWarmup:
    """Run a warm-up of `template` on this module's worker and return its finished row."""
    warmup = CacheWarmup.objects.create(
        template=template, seed=seed, steps=STEPS, guidance=30.0, variant="kv",
        model=catalog.default_model().name,
    )
    warmups.enqueue_warmup(warmup, queue=QUEUE)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        warmup.refresh_from_db()
        if warmup.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            assert warmup.status == JobStatus.SUCCEEDED, warmup.error
            return warmup
        assert time.monotonic() < deadline, f"warm-up {warmup.pk} did not finish within {TIMEOUT_S} s"
        time.sleep(0.2)


def wait_for(condition, failure: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{failure} within {TIMEOUT_S} s"
        time.sleep(0.2)


def tier_of(warmup: CacheWarmup) -> str:
    return CacheWarmup.objects.get(pk=warmup.pk).cache_tier


def test_restart_and_delete_update_worker_cache(worker_env, media_root, make_user, settings, tmp_path):
    settings.EDITOR_WARMUP_ON_CREATE = False
    cache_dir = tmp_path / "cache"
    # Without write-through, memory entries are lost with the process, which the records must show.
    env = {**worker_env, "EDITOR_CACHE_DIR": str(cache_dir), "EDITOR_CACHE_POLICY": "lru",
           "EDITOR_ENGINE_MAX_BATCH": "1", "EDITOR_CACHE_WRITE_THROUGH": "0"}
    name = f"residency-{uuid.uuid4().hex[:6]}"
    command = worker_command([QUEUE], name=name, batch=1)
    owner = make_user()
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    template = services.create_template(owner=owner, name="first", image=image)

    def file_of(warmup: CacheWarmup) -> Path:
        return cache_dir / f"{warmup.cache_key}.safetensors"

    with running_worker(command, env, [QUEUE], tmp_path / "worker-1.log"):
        first = warm(template, seed=0)
    assert first.cache_tier == "memory"
    assert first.worker.startswith(f"{name}@")
    entry_bytes = first.cache_bytes

    # Room for one entry in memory, so the second warm-up spills the first to disk.
    env["EDITOR_CACHE_BYTES"] = str(entry_bytes * 3 // 2)
    with running_worker(command, env, [QUEUE], tmp_path / "worker-2.log"):
        wait_for(lambda: tier_of(first) == "none", "the restarted worker did not mark the lost entry")
        spilled = warm(template, seed=1)
        in_memory = warm(template, seed=2)
    assert (spilled.cache_tier, in_memory.cache_tier) == ("memory", "memory")
    assert file_of(spilled).exists()
    assert not file_of(in_memory).exists()

    with running_worker(command, env, [QUEUE], tmp_path / "worker-3.log"):
        wait_for(lambda: tier_of(in_memory) == "none", "the restarted worker did not mark the lost entry")
        assert tier_of(spilled) == "disk"
        assert tier_of(first) == "none"

        # A second template with the same content reuses the disk entry and vouches for it too.
        twin = services.create_template(owner=owner, name="twin", image=image)
        reused = warm(twin, seed=1)
        assert (reused.cache_key, reused.cache_tier) == (spilled.cache_key, "disk")
        assert "warmup" not in reused.timings

        template.delete()
        twin.delete()
        wait_for(lambda: not file_of(spilled).exists(), "the worker did not delete the dropped entry's file")


def test_written_through_entry_survives_restart(worker_env, media_root, make_user, settings, tmp_path):
    """With write-through (the default) a warm-up's entry is on disk too, so a restart keeps it as `disk`."""
    settings.EDITOR_WARMUP_ON_CREATE = False
    cache_dir = tmp_path / "cache"
    env = {**worker_env, "EDITOR_CACHE_DIR": str(cache_dir), "EDITOR_ENGINE_MAX_BATCH": "1"}
    env.pop("EDITOR_CACHE_WRITE_THROUGH", None)
    command = worker_command([QUEUE], name=f"through-{uuid.uuid4().hex[:6]}", batch=1)
    image = np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    template = services.create_template(owner=make_user(), name="kept", image=image)

    with running_worker(command, env, [QUEUE], tmp_path / "worker-1.log"):
        warmed = warm(template, seed=0)
    assert warmed.cache_tier == "memory"
    assert (cache_dir / f"{warmed.cache_key}.safetensors").exists()

    with running_worker(command, env, [QUEUE], tmp_path / "worker-2.log"):
        wait_for(lambda: tier_of(warmed) == "disk", "the restarted worker did not find the entry on disk")
