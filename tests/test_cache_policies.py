"""Eviction order of each policy on short traces; expected orders are worked out by hand in comments."""

import pytest

from cache.policies import (
    EvictionPolicy,
    FrequencyHistory,
    LfuPolicy,
    LruPolicy,
    WTinyLfuPolicy,
    create_policy,
)


def replay(policy: EvictionPolicy, trace: str, capacity: int) -> tuple[list[str], set[str]]:
    """Replay single-letter keys of size 1 the way the store does; return evictions and residents."""
    resident: set[str] = set()
    evicted: list[str] = []
    for key in trace.split():
        if key in resident:
            policy.on_hit(key)
            continue
        policy.on_miss(key)
        while len(resident) + 1 > capacity:
            victim = policy.victim(1)
            assert victim in resident
            resident.remove(victim)
            policy.on_remove(victim)
            evicted.append(victim)
        resident.add(key)
        policy.on_insert(key, 1)
    return evicted, resident


def test_lru_evicts_least_recent() -> None:
    # [A B C], A hit -> B C A; D evicts B; B evicts C; E evicts A.
    evicted, resident = replay(LruPolicy(), "A B C A D B E", capacity=3)

    assert evicted == ["B", "C", "A"]
    assert resident == {"D", "B", "E"}


def test_lfu_evicts_least_frequent() -> None:
    # Hits: A 3, B 2, C 1. D evicts C (1), then E evicts D (1, the only count-1 entry).
    evicted, resident = replay(LfuPolicy(), "A B C A A B D E", capacity=3)

    assert evicted == ["C", "D"]
    assert resident == {"A", "B", "E"}


def test_lfu_breaks_ties_by_recency() -> None:
    evicted, _ = replay(LfuPolicy(), "A B C D", capacity=3)

    assert evicted == ["A"]


def make_wtinylfu() -> WTinyLfuPolicy:
    # Capacity 4: window 1, main 3 (probation + protected, protected at most 2).
    return WTinyLfuPolicy(4, window_fraction=0.25, protected_fraction=0.8, aging_period=1000)


def test_wtinylfu_keeps_hot_through_one_offs() -> None:
    # A, B, C reach frequency 2 and move to probation; D sits in the window.
    # X: candidate D (1) loses to victim A (2) -> evict D. Y: candidate X (1) loses to A -> evict X.
    evicted, resident = replay(make_wtinylfu(), "A A B B C C D X Y", capacity=4)

    assert evicted == ["D", "X"]
    assert resident == {"A", "B", "C", "Y"}


def test_wtinylfu_admits_new_hot_key() -> None:
    # After the trace above, Z evicts Y (1 against A's 2) and reaches 3 on two hits in the window.
    # W makes Z the candidate. Z (3) beats A (2), so A is evicted and Z moves to probation.
    evicted, resident = replay(make_wtinylfu(), "A A B B C C D X Y Z Z Z W", capacity=4)

    assert evicted == ["D", "X", "Y", "A"]
    assert resident == {"B", "C", "Z", "W"}


def test_lru_flushes_hot_on_same_trace() -> None:
    evicted, _ = replay(LruPolicy(), "A A B B C C D X Y Z Z Z W", capacity=4)

    assert evicted == ["A", "B", "C", "D"]


def test_wtinylfu_protected_hit_survives_probation() -> None:
    # A, B, C reach probation and D sits in the window. The hits on B move it to protected.
    # E: candidate D (1) ties probation head A (1), so D goes. F: candidate E (2) beats A (1).
    # G: candidate F (2) beats C (1). B, in protected, is never the duel's victim.
    evicted, resident = replay(make_wtinylfu(), "A B C D B B E E F F G G", capacity=4)

    assert evicted == ["D", "A", "C"]
    assert resident == {"B", "E", "F", "G"}


def test_frequency_history_halves_each_period() -> None:
    history = FrequencyHistory(aging_period=4)
    for key in ("a", "a", "a", "b"):
        history.record(key)

    assert history.frequency("a") == 1
    assert history.frequency("b") == 0


def test_frequency_history_saturates() -> None:
    history = FrequencyHistory(aging_period=1000)
    for _ in range(40):
        history.record("a")

    assert history.frequency("a") == FrequencyHistory.MAX_COUNT


def test_wtinylfu_variable_sizes_fit_budget() -> None:
    policy = WTinyLfuPolicy(100, window_fraction=0.1)
    sizes = {"a": 40, "b": 30, "c": 20, "d": 50}
    resident: dict[str, int] = {}
    for key in ["a", "b", "a", "c", "d", "a", "d", "b"]:
        if key in resident:
            policy.on_hit(key)
            continue
        policy.on_miss(key)
        while sum(resident.values()) + sizes[key] > 100:
            victim = policy.victim(sizes[key])
            assert victim in resident
            del resident[victim]
            policy.on_remove(victim)
        resident[key] = sizes[key]
        policy.on_insert(key, sizes[key])
        assert sum(resident.values()) <= 100
        assert len(policy) == len(resident)


@pytest.mark.parametrize("name", ["lru", "lfu", "wtinylfu"])
def test_create_policy_by_name(name: str) -> None:
    assert create_policy(name, 1024).name == name


def test_create_policy_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="gdsf"):
        create_policy("gdsf", 1024)
