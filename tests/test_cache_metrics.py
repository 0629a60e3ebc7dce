import threading
from pathlib import Path

import pytest

from cache.config import CacheSettings, build_store
from cache.metrics import CacheMetrics
from cache.plan import BlockProfile, ComputeModel, LoadModel, plan_masked
from cache.testing import make_activations, make_key


def test_prometheus_counters_and_gauges() -> None:
    metrics = CacheMetrics()
    metrics.increment("editor_cache_hits_total", tier="memory")
    metrics.increment("editor_cache_hits_total", tier="memory")
    metrics.increment("editor_cache_misses_total")
    metrics.set_gauge("editor_cache_bytes", 1024, tier="disk")

    text = metrics.render_prometheus()

    assert "# TYPE editor_cache_hits_total counter" in text
    assert 'editor_cache_hits_total{tier="memory"} 2' in text
    assert "editor_cache_misses_total 1" in text
    assert "# TYPE editor_cache_bytes gauge" in text
    assert 'editor_cache_bytes{tier="disk"} 1024' in text
    assert text.endswith("\n")


def test_prometheus_load_histogram() -> None:
    metrics = CacheMetrics()
    metrics.observe_load(0.003, "disk")
    metrics.observe_load(2.0, "disk")

    text = metrics.render_prometheus()

    assert 'editor_cache_load_seconds_bucket{le="0.001",tier="disk"} 0' in text
    assert 'editor_cache_load_seconds_bucket{le="0.005",tier="disk"} 1' in text
    assert 'editor_cache_load_seconds_bucket{le="5",tier="disk"} 2' in text
    assert 'editor_cache_load_seconds_bucket{le="+Inf",tier="disk"} 2' in text
    assert 'editor_cache_load_seconds_count{tier="disk"} 2' in text
    assert 'editor_cache_load_seconds_sum{tier="disk"} 2.003' in text


def test_prometheus_escapes_label_values() -> None:
    metrics = CacheMetrics()
    metrics.increment("editor_cache_rejections_total", tier="disk", reason='bad "quote"\\')

    assert 'reason="bad \\"quote\\"\\\\"' in metrics.render_prometheus()


def test_counters_are_thread_safe() -> None:
    metrics = CacheMetrics()

    def hit() -> None:
        for _ in range(1000):
            metrics.increment("editor_cache_hits_total", tier="memory")

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert metrics.counter("editor_cache_hits_total", tier="memory") == 4000


def test_key_summaries_follow_store(tmp_path: Path) -> None:
    settings = CacheSettings(memory_bytes=1 << 20, disk_bytes=1 << 22, directory=tmp_path, policy="lru", codec="fp16")
    store = build_store(settings)
    store.put_tensors(make_key(1), make_activations(1, 2, 8, 8), steps=1, blocks=2)
    store.get(make_key(1))
    store.get(make_key(1))

    summaries = {row.digest: row for row in store.metrics.key_summaries()}

    row = summaries[make_key(1).digest()]
    assert row.hits == 2
    assert row.tier == "memory"
    assert row.size_bytes == store.get(make_key(1)).nbytes  # type: ignore[union-attr]
    assert row.last_used > 0


def test_plan_decisions_counted() -> None:
    metrics = CacheMetrics()
    profile = BlockProfile(ComputeModel(0.0, 0.0, 0.01), LoadModel(latency_s=0.5, bandwidth_bytes_per_s=1e18))
    plan_masked(profile, steps=1, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0, metrics=metrics)
    plan_masked(profile, steps=1, blocks=4, total_tokens=10, masked_tokens=10, block_bytes=0, metrics=metrics)

    assert metrics.counter("editor_cache_plan_decisions_total", decision="cache_with_full_prefix") == 1
    assert metrics.counter("editor_cache_plan_decisions_total", decision="full_recompute") == 1


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDITOR_CACHE_BYTES", "4096")
    monkeypatch.setenv("EDITOR_CACHE_DISK_BYTES", "0")
    monkeypatch.setenv("EDITOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EDITOR_CACHE_POLICY", "lfu")
    monkeypatch.setenv("EDITOR_CACHE_DTYPE", "int8")
    monkeypatch.setenv("EDITOR_CACHE_WRITE_THROUGH", "off")

    settings = CacheSettings.from_env()
    store = build_store(settings)

    assert settings == CacheSettings(4096, 0, tmp_path, "lfu", "int8", write_through=False)
    assert not store.write_through
    assert CacheSettings().write_through
    assert store.disk is None
    assert store.policy.name == "lfu"
    assert store.codec == "int8"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EDITOR_CACHE_BYTES", "8GB", "not an integer"),
        ("EDITOR_CACHE_DISK_BYTES", "-1", "negative"),
        ("EDITOR_CACHE_POLICY", "arc", "not supported"),
        ("EDITOR_CACHE_DTYPE", "int4", "not supported"),
        ("EDITOR_CACHE_WRITE_THROUGH", "maybe", "not a switch"),
    ],
)
def test_settings_reject_invalid(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ValueError, match=message):
        CacheSettings.from_env()
