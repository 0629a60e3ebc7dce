"""Plan decisions on synthetic profiles; expected times are worked out by hand in comments."""

import pytest

import cache.plan
from cache.plan import (
    BlockProfile,
    ComputeModel,
    LoadModel,
    ProfileTracker,
    fit_compute_model,
    fit_load_model,
    plan_masked,
    predict_overlapped,
    profile_blocks,
)

# 10 tokens: a full block takes 0.01 * 10 * 10 = 1.0 s, a masked block with 2 tokens 0.01 * 2 * 10 = 0.2 s,
# and one block load 0.5 s.
PROFILE = BlockProfile(ComputeModel(c0=0.0, c1=0.0, c2=0.01), LoadModel(latency_s=0.5, bandwidth_bytes_per_s=1e18))


def test_predict_one_step_by_k() -> None:
    # k=0: loads end 0.5/1.0/1.5/2.0, each masked block runs 0.2 s after its load -> 2.2.
    # k=1: full block 0-1.0; loads end 0.5/1.0/1.5; masked 1.0-1.2, 1.2-1.4, 1.5-1.7 -> 1.7.
    # k=2: 2.0 + 0.2 + 0.2 = 2.4. k=3: 3.0 + 0.2 = 3.2.
    expected = {0: 2.2, 1: 1.7, 2: 2.4, 3: 3.2}
    for k, seconds in expected.items():
        predicted = predict_overlapped(
            PROFILE, steps=1, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0, full_prefix_blocks=k
        )
        assert predicted == pytest.approx(seconds)


def test_plan_picks_k_one() -> None:
    plan = plan_masked(PROFILE, steps=1, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0)

    assert plan.use_cache
    assert plan.full_prefix_blocks == 1
    assert plan.predicted_s == pytest.approx(1.7)
    assert plan.predicted_sequential_s == pytest.approx(4 * 0.7)
    assert plan.predicted_full_recompute_s == pytest.approx(4.0)
    assert "1 full block" in plan.reason


def test_plan_two_steps_carry_loads() -> None:
    # k=1, step 1: full block 1.7-2.7; loads end 2.0/2.5/3.0; masked 2.7-2.9, 2.9-3.1, 3.1-3.3.
    # k=0: eight loads end at 4.0, the last masked block ends 4.2.
    plan = plan_masked(PROFILE, steps=2, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0)

    assert plan.full_prefix_blocks == 1
    assert plan.predicted_by_k[0] == pytest.approx(4.2)
    assert plan.predicted_by_k[1] == pytest.approx(3.3)
    assert plan.load_order(steps=2, blocks=4) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


def test_plan_full_mask_skips_cache() -> None:
    plan = plan_masked(PROFILE, steps=1, blocks=4, total_tokens=10, masked_tokens=10, block_bytes=0)

    assert not plan.use_cache
    assert plan.full_prefix_blocks is None
    assert plan.predicted_s == pytest.approx(4.0)
    assert plan.load_order(steps=1, blocks=4) == []
    assert "full recompute" in plan.reason


def test_plan_fast_loads_use_k_zero() -> None:
    fast = BlockProfile(PROFILE.compute, LoadModel(latency_s=0.01, bandwidth_bytes_per_s=1e18))
    # k=0: 0.01 + 4 * 0.2 = 0.81 s.
    plan = plan_masked(fast, steps=1, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0)

    assert plan.full_prefix_blocks == 0
    assert plan.predicted_s == pytest.approx(0.81)


def test_plan_depth_gates_loads() -> None:
    # k=1, depth 1: load 0 ends 0.5, block 1 runs 1.0-1.2. Load 1 waits until block 1 was taken
    # (1.0) and ends 1.5, block 2 runs 1.5-1.7. Load 2 waits for 1.5, ends 2.0, block 3 runs 2.0-2.2.
    # Without the depth limit the same plan takes 1.7 s.
    gated = predict_overlapped(
        PROFILE, steps=1, blocks=4, total_tokens=10, masked_tokens=2, block_bytes=0, full_prefix_blocks=1, depth=1
    )

    assert gated == pytest.approx(2.2)


def test_plan_rejects_bad_tokens() -> None:
    with pytest.raises(ValueError, match="masked_tokens"):
        plan_masked(PROFILE, steps=1, blocks=4, total_tokens=10, masked_tokens=11, block_bytes=0)


def test_fit_compute_model_recovers_quadratic() -> None:
    tokens = [256, 512, 1024, 2048]
    seconds = [0.002 + 1e-5 * n + 3e-9 * n * n for n in tokens]

    model = fit_compute_model(tokens, seconds)

    assert model.c0 == pytest.approx(0.002, rel=1e-6)
    assert model.c1 == pytest.approx(1e-5, rel=1e-6)
    assert model.c2 == pytest.approx(3e-9, rel=1e-6)


def test_fit_compute_model_keeps_noisy_fit_non_negative() -> None:
    # The failed profile of a tiny block: the middle count ran slower than the largest.
    tokens = [50, 100, 200]
    seconds = [0.00220, 0.00225, 0.00168]

    model = fit_compute_model(tokens, seconds)

    assert min(model.c0, model.c1, model.c2) >= 0.0
    assert model.seconds(200, 200) >= model.seconds(20, 20)
    assert model.seconds(100, 100) == pytest.approx(sum(seconds) / 3, rel=1e-6)


def test_fit_load_model_recovers_bandwidth() -> None:
    sizes = [1 << 20, 4 << 20, 16 << 20]
    seconds = [0.001 + size / 2e9 for size in sizes]

    model = fit_load_model(sizes, seconds)

    assert model.latency_s == pytest.approx(0.001, rel=1e-6)
    assert model.bandwidth_bytes_per_s == pytest.approx(2e9, rel=1e-6)


def test_fit_load_model_rejects_one_size() -> None:
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_load_model([1024, 1024], [0.1, 0.1])


def test_tracker_moves_scale_by_alpha() -> None:
    tracker = ProfileTracker(PROFILE, alpha=0.5)

    # A full block measured at 2.0 s against 1.0 s predicted: scale 0.5 * 1 + 0.5 * 2 = 1.5.
    profile = tracker.record(compute=(10, 10, 2.0))
    assert profile.compute.scale == pytest.approx(1.5)
    assert profile.compute.seconds(10, 10) == pytest.approx(1.5)

    # A load measured at 0.25 s against 0.5 s predicted: scale 0.5 * 1 + 0.5 * 0.5 = 0.75.
    profile = tracker.record(load=(0, 0.25))
    assert profile.load.scale == pytest.approx(0.75)
    assert tracker.profile == profile


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_profile_blocks_fits_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(cache.plan, "time", clock)

    def compute_block(tokens: int) -> None:
        clock.now += 0.001 + 2e-8 * tokens * tokens

    def load_bytes(size: int) -> None:
        clock.now += 0.0005 + size / 1e9

    profile = profile_blocks(compute_block, [128, 256, 512], load_bytes, [1 << 20, 8 << 20], repeats=3)

    assert profile.compute.seconds(1024, 1024) == pytest.approx(0.001 + 2e-8 * 1024 * 1024, rel=1e-6)
    assert profile.load.bandwidth_bytes_per_s == pytest.approx(1e9, rel=1e-6)
    assert profile.load.latency_s == pytest.approx(0.0005, rel=1e-4)


def test_fit_compute_model_fixed_key_tokens() -> None:
    # Masked runs at one resolution: 0.01 + 0.002 * q seconds, whatever the key token count.
    queries = [100, 400, 1024]
    seconds = [0.01 + 0.002 * q for q in queries]

    model = fit_compute_model(queries, seconds, key_tokens=1024)

    assert model.c2 == 0.0
    assert model.seconds(700, 1024) == pytest.approx(0.01 + 0.002 * 700)
