"""Worker cache decisions: a warm-up serves only jobs with identical cache identity."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from editing.models import CacheOutcome
from tests.conftest import PHOTOS
from cache.plan import BlockProfile, ComputeModel, LoadModel, ProfileTracker
from workers import cache_streaming, caching, template_cache
from workers.model_loading import load_model
from workers.runner import EditRequest, RunnerSettings, prepare_working_inputs, run_edit

STEPS = 2


@pytest.fixture(scope="module")
def model(test_model_path):
    return load_model(str(test_model_path), var_dir=test_model_path.parent)


@pytest.fixture
def store(cache_store):
    return cache_store


@pytest.fixture(scope="module")
def template() -> np.ndarray:
    from editing.imaging import read_template

    image = read_template((PHOTOS / "chelsea.png").read_bytes(), max_pixels=10**7, max_bytes=10**8)
    return image[:160, :200]


def small_mask(template: np.ndarray) -> np.ndarray:
    mask = np.zeros(template.shape[:2], dtype=bool)
    mask[40:80, 60:120] = True
    return mask


def key_for(model, image, *, steps=STEPS, seed=0, guidance=30.0, settings=None):
    settings = settings or RunnerSettings()
    inputs = caching.working_template(model, image, settings)
    return caching.job_cache_key(
        model, inputs, template_hash="hash-of-template", steps=steps, seed=seed, guidance=guidance,
        variant="kv", settings=settings,
    )


def test_warmup_then_hit(model, store, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    caching.warm_template(model, caching.working_template(model, template, settings), key, settings=settings)
    decision = caching.decide(model, key, 0.2, pending_same_key=0)
    assert decision.outcome == CacheOutcome.HIT
    assert decision.activations is not None
    assert decision.activations.metadata.num_steps == STEPS


@pytest.mark.parametrize(
    "change",
    [
        {"steps": STEPS + 1},
        {"seed": 1},
        {"guidance": 3.5},
    ],
    ids=["steps", "seed", "guidance"],
)
def test_changed_parameter_misses(model, store, template, change):
    settings = RunnerSettings()
    warm_key = key_for(model, template)
    caching.warm_template(model, caching.working_template(model, template, settings), warm_key, settings=settings)
    other = key_for(model, template, **change)
    assert other != warm_key
    assert caching.decide(model, other, 0.2, pending_same_key=0).outcome == CacheOutcome.MISS_FULL


def test_changed_resolution_misses(model, store, template):
    settings = RunnerSettings()
    caching.warm_template(
        model, caching.working_template(model, template, settings), key_for(model, template), settings=settings
    )
    smaller = template[:128, :160]
    assert caching.decide(model, key_for(model, smaller), 0.2, pending_same_key=0).outcome == CacheOutcome.MISS_FULL


def test_changed_model_revision_misses(model, store, template):
    settings = RunnerSettings()
    caching.warm_template(
        model, caching.working_template(model, template, settings), key_for(model, template), settings=settings
    )
    rebuilt = dataclasses.replace(model, revision=model.revision + "-rebuilt")
    assert caching.decide(rebuilt, key_for(rebuilt, template), 0.2, pending_same_key=0).outcome == CacheOutcome.MISS_FULL


def test_large_mask_bypasses_cache(model, store, template):
    decision = caching.decide(model, key_for(model, template), 0.95, pending_same_key=0)
    assert decision.outcome == CacheOutcome.BYPASS
    assert decision.flop_fraction == 1.0


@pytest.mark.parametrize(
    ("pending", "fraction", "expected"),
    [(0, 0.1, False), (1, 0.1, True), (1, 0.6, False), (5, 0.5, True)],
)
def test_warm_first_rule(pending, fraction, expected):
    assert caching.should_warm_first(pending, fraction) is expected


def test_cached_edit_keeps_pixels_outside_mask(model, store, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    outcome = caching.warm_template(
        model, caching.working_template(model, template, settings), key, settings=settings
    )
    mask = small_mask(template)
    request = EditRequest(image=template, mask=mask, prompt="a hat", seed=0, steps=STEPS, guidance=30.0)
    result = run_edit(model, request, settings=settings, activations=outcome.activations)
    from editing.imaging import dilate

    outside = ~dilate(mask, settings.keep_px + 1)
    assert result.image.shape == template.shape
    assert np.array_equal(result.image[outside], template[outside])
    assert not np.array_equal(result.image[mask], template[mask])


def test_masked_flop_fraction_tracks_mask(model, template):
    settings = RunnerSettings()
    small = prepare_working_inputs(template, small_mask(template), settings.max_work_pixels, 16)
    full = prepare_working_inputs(template, np.ones(template.shape[:2], bool), settings.max_work_pixels, 16)
    small_fraction = caching.masked_flop_fraction(model, small, variant="kv", settings=settings)
    full_fraction = caching.masked_flop_fraction(model, full, variant="kv", settings=settings)
    assert 0 < small_fraction < 0.8
    assert full_fraction == pytest.approx(1.0)


@pytest.fixture
def disk_only_store(monkeypatch, tmp_path):
    """A store with no memory tier, so every warm-up lands on disk."""
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDITOR_CACHE_BYTES", "0")
    template_cache.reset_store()
    cache_streaming.reset_profile()
    yield template_cache.get_store()
    template_cache.reset_store()
    cache_streaming.reset_profile()


def set_profile(load_seconds_per_block: float) -> None:
    profile = BlockProfile(
        ComputeModel(c0=0.0, c1=1e-4, c2=0.0),
        LoadModel(latency_s=load_seconds_per_block, bandwidth_bytes_per_s=1e15),
    )
    cache_streaming._tracker = ProfileTracker(profile)


def streamed_counts(model, template, settings) -> caching.TokenCounts:
    inputs = prepare_working_inputs(template, small_mask(template), settings.max_work_pixels, 16)
    return caching.token_counts(model, inputs, settings)


def test_disk_entry_streams_into_masked_edit(model, disk_only_store, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    outcome = caching.warm_template(
        model, caching.working_template(model, template, settings), key, settings=settings
    )
    assert outcome.tier == "disk"
    set_profile(load_seconds_per_block=0.0)
    decision = caching.decide(model, key, 0.2, pending_same_key=0, counts=streamed_counts(model, template, settings))
    assert decision.outcome == CacheOutcome.HIT
    assert decision.streamed is not None
    assert decision.streamed.source is not None
    assert disk_only_store.tier_of(key) == "disk"

    request = EditRequest(image=template, mask=small_mask(template), prompt="a hat", seed=0, steps=STEPS, guidance=30.0)
    try:
        streamed = run_edit(
            model, request, settings=settings, activations=decision.activations,
            block_source=decision.streamed.source, full_prefix_blocks=decision.full_prefix_blocks,
        )
    finally:
        decision.close()
    # The warm-up's own activations, before the store's fp16 encoding.
    in_memory = run_edit(model, request, settings=settings, activations=outcome.activations)
    assert np.abs(streamed.image.astype(int) - in_memory.image.astype(int)).max() <= 2


def test_slow_disk_plan_chooses_full_recompute(model, disk_only_store, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    caching.warm_template(model, caching.working_template(model, template, settings), key, settings=settings)
    set_profile(load_seconds_per_block=10.0)
    decision = caching.decide(model, key, 0.2, pending_same_key=0, counts=streamed_counts(model, template, settings))
    assert decision.outcome == CacheOutcome.BYPASS
    assert decision.streamed is None


@pytest.mark.parametrize(("width", "height"), [(200, 160), (451, 300), (3000, 2000)])
def test_working_size_matches_prepared_inputs(model, width, height):
    settings = RunnerSettings()
    image = np.zeros((height, width, 3), dtype=np.uint8)
    inputs = prepare_working_inputs(image, np.zeros((height, width), bool), settings.max_work_pixels, 16)
    assert caching.working_size(model, width, height, settings) == inputs.padded


def test_prefetch_promotes_disk_entry(model, monkeypatch, tmp_path, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDITOR_CACHE_BYTES", "0")
    template_cache.reset_store()
    caching.warm_template(model, caching.working_template(model, template, settings), key, settings=settings)
    # A worker restart: a new store with a memory tier finds the entry on disk.
    monkeypatch.delenv("EDITOR_CACHE_BYTES")
    template_cache.reset_store()
    store = template_cache.get_store()
    assert store.tier_of(key) == "disk"
    assert caching.prefetch_keys([key]) == 1
    assert caching.prefetcher().prefetch(key).result(timeout=30) is True
    assert store.tier_of(key) == "memory"
    template_cache.reset_store()


def test_measured_profile_is_positive(model, tmp_path):
    profile = cache_streaming.measured_profile(model, 200, tmp_path)
    assert profile.compute.seconds(200, 200) > 0
    assert profile.compute.seconds(200, 200) >= profile.compute.seconds(20, 200)
    assert profile.load.bandwidth_bytes_per_s > 0
    assert list(tmp_path.iterdir()) == []


def test_concurrent_profiles_share_a_folder(model, tmp_path):
    """Two workers that share a cache folder profile at the same time, and neither deletes the other's read file."""
    profiles = []
    errors: list[BaseException] = []

    def profile() -> None:
        try:
            profiles.append(cache_streaming.measured_profile(model, 200, tmp_path))
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=profile) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(profiles) == 2
    assert list(tmp_path.iterdir()) == []


def test_dropped_entry_counts_as_miss(model, store, template):
    settings = RunnerSettings()
    key = key_for(model, template)
    caching.warm_template(model, caching.working_template(model, template, settings), key, settings=settings)
    misses_before = store.stats().misses

    decision = caching.decide(model, key, 0.2, pending_same_key=0, cache_valid=False)

    assert decision.outcome == CacheOutcome.MISS_FULL
    assert not store.contains(key)
    assert store.stats().misses == misses_before + 1
