"""Routing decisions and latency accounting of the cluster simulation, on hand-built scenarios."""

from __future__ import annotations

import argparse

import numpy
import pytest

from bench.cluster_sim import (
    Cluster,
    CostModel,
    Job,
    Scenario,
    build_cost_model,
    draw_workload,
    make_jobs,
    p95_margin,
    parse_loads,
    run,
    simulate,
)

# Hit seconds = 1 + 0.01 x masked tokens for 0..100 tokens; a miss takes 10 s.
COST = CostModel(hit_s_by_tokens=tuple(1.0 + 0.01 * tokens for tokens in range(101)), miss_s=10.0)


def job(index: int, arrival_s: float, template: int = 0, masked_tokens: int = 10) -> Job:
    return Job(index=index, arrival_s=arrival_s, template=template, masked_tokens=masked_tokens)


def route(cluster: Cluster, policy: str, request: Job) -> int:
    cluster.advance(request.arrival_s)
    worker = cluster.choose(policy, request)
    cluster.assign(policy, request, worker)
    return worker


def test_round_robin_assigns_in_order() -> None:
    cluster = Cluster(workers=3, cache_entries=2, cost=COST)
    workers = [route(cluster, "round_robin", job(i, 0.0)) for i in range(7)]
    assert workers == [0, 1, 2, 0, 1, 2, 0]


def test_least_requests_picks_idle_worker() -> None:
    cluster = Cluster(workers=3, cache_entries=2, cost=COST)
    # Workers 0 and 2 get a job each; worker 1 stays idle.
    cluster.assign("least_requests", job(0, 0.0), 0)
    cluster.assign("least_requests", job(1, 0.0), 2)
    assert route(cluster, "least_requests", job(2, 0.5)) == 1


def test_least_requests_counts_finished_jobs_as_gone() -> None:
    cluster = Cluster(workers=2, cache_entries=2, cost=COST)
    cluster.assign("least_requests", job(0, 0.0, masked_tokens=0), 0)  # hit or not, done by 10 s
    cluster.assign("least_requests", job(1, 0.0, masked_tokens=0), 1)
    cluster.assign("least_requests", job(2, 0.0, masked_tokens=0), 1)
    # At 100 s every job has finished, so both workers are idle and the tie goes to worker 0.
    assert route(cluster, "least_requests", job(3, 100.0)) == 0


def test_cost_sees_running_miss_and_expected_waits() -> None:
    cluster = Cluster(workers=2, cache_entries=4, cost=COST)
    # Worker 0 runs one miss (10 s); worker 1 runs a miss and has a second job of template 2 waiting,
    # which will hit (1.1 s) but which the cost router predicts at the hit rate seen so far.
    cluster.assign("cost", job(0, 0.0, template=1, masked_tokens=100), 0)
    cluster.assign("cost", job(1, 0.0, template=2, masked_tokens=10), 1)
    expected = cluster.expected_service_s(10)
    cluster.assign("cost", job(2, 0.0, template=2, masked_tokens=10), 1)
    now_s = 0.5
    assert cluster.states[0].backlog_s(now_s) == pytest.approx(9.5)
    assert cluster.states[1].backlog_s(now_s) == pytest.approx(9.5 + expected)
    assert route(cluster, "cost", job(3, now_s, template=3)) == 0
    # Once a job starts, its real service time replaces the prediction.
    assert cluster.states[1].backlog_s(10.5) == pytest.approx(1.1 - 0.5)


def test_expected_service_follows_hit_rate() -> None:
    cluster = Cluster(workers=1, cache_entries=4, cost=COST)
    assert cluster.expected_service_s(10) == pytest.approx(0.5 * 1.1 + 0.5 * 10.0)
    cluster.assign("cost", job(0, 0.0, template=1, masked_tokens=10), 0)  # a miss
    cluster.assign("cost", job(1, 0.0, template=1, masked_tokens=10), 0)  # a hit
    assert cluster.expected_service_s(10) == pytest.approx(0.5 * 1.1 + 0.5 * 10.0)
    cluster.assign("cost", job(2, 0.0, template=1, masked_tokens=10), 0)  # a hit
    assert cluster.expected_service_s(10) == pytest.approx(2 / 3 * 1.1 + 1 / 3 * 10.0)


def affinity_cluster() -> Cluster:
    """Return two idle workers at 50 s: worker 0 caches template 5, worker 1 caches template 6."""
    cluster = Cluster(workers=2, cache_entries=4, cost=COST)
    cluster.assign("cost_affinity", job(0, 0.0, template=5), 0)
    cluster.assign("cost_affinity", job(1, 0.0, template=6), 1)
    return cluster


def test_cost_affinity_picks_worker_holding_template() -> None:
    cluster = affinity_cluster()
    # Worker 0 gets a 1.5 s hit queued at 50 s. A template 5 job then predicts 1.5 + 1.1 = 2.6 s on
    # worker 0 and a 10 s miss on the idle worker 1: the miss penalty outweighs the backlog.
    cluster.assign("cost_affinity", job(2, 50.0, template=5, masked_tokens=50), 0)
    assert cluster.states[0].backlog_s(50.0) == pytest.approx(1.5)
    assert route(cluster, "cost_affinity", job(3, 50.0, template=5)) == 0


def test_cost_ignores_template_residency() -> None:
    cluster = affinity_cluster()
    cluster.assign("cost_affinity", job(2, 50.0, template=5, masked_tokens=50), 0)
    assert cluster.choose("cost", job(3, 50.0, template=5)) == 1


def test_cost_affinity_leaves_long_backlog() -> None:
    cluster = affinity_cluster()
    # Worker 0 gets a 10 s miss of template 7 queued at 50 s. A template 5 job predicts 10 + 1.1 = 11.1 s
    # on worker 0 and a 10 s miss on worker 1: the backlog outweighs the miss penalty.
    cluster.assign("cost_affinity", job(2, 50.0, template=7), 0)
    assert cluster.states[0].backlog_s(50.0) == pytest.approx(10.0)
    assert route(cluster, "cost_affinity", job(3, 50.0, template=5)) == 1


def test_cache_evicts_least_recently_used_template() -> None:
    cluster = Cluster(workers=1, cache_entries=2, cost=COST)
    hits = [cluster.assign("round_robin", job(i, 0.0, template=t), 0).hit for i, t in enumerate([1, 2, 1, 3, 2, 1])]
    # 1 miss, 2 miss, 1 hit, 3 miss (evicts 2), 2 miss (evicts 1), 1 miss.
    assert hits == [False, False, True, False, False, False]


def test_single_job_latency_equals_service_time() -> None:
    outcomes = simulate([job(0, 3.0, masked_tokens=40)], "cost", workers=4, cache_entries=2, cost=COST)
    assert outcomes[0].latency_s == pytest.approx(COST.miss_s)
    # The second job of the same template hits: 1 + 0.01 x 40 = 1.4 s.
    jobs = [job(0, 3.0, masked_tokens=40), job(1, 20.0, masked_tokens=40)]
    warm = simulate(jobs, "round_robin", workers=1, cache_entries=2, cost=COST)
    assert warm[1].hit
    assert warm[1].latency_s == pytest.approx(1.4)


def test_queued_job_waits_for_previous() -> None:
    outcomes = simulate([job(0, 0.0), job(1, 1.0)], "round_robin", workers=1, cache_entries=2, cost=COST)
    assert outcomes[1].start_s == pytest.approx(10.0)
    assert outcomes[1].latency_s == pytest.approx(10.0 - 1.0 + 1.1)


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy='random'"):
        simulate([job(0, 0.0)], "random", workers=1, cache_entries=1, cost=COST)


def test_same_seed_gives_identical_results() -> None:
    cost = build_cost_model(image_tokens=64)

    def latencies(seed: int) -> list[float]:
        scenario = Scenario(workers=4, jobs=300, templates=20, cache_entries=4, seed=seed)
        gaps, templates, masked = draw_workload(scenario, cost.image_tokens)
        jobs = make_jobs(gaps, templates, masked, rate_per_s=2.0)
        return [outcome.latency_s for outcome in simulate(jobs, "cost_affinity", workers=4, cache_entries=4, cost=cost)]

    assert latencies(3) == latencies(3)
    assert latencies(3) != latencies(4)


def test_workload_mask_ratio_mean_near_target() -> None:
    scenario = Scenario(workers=1, jobs=20000, seed=1)
    _, templates, masked = draw_workload(scenario, 1024)
    assert numpy.mean(masked / 1024) == pytest.approx(0.11, abs=0.005)
    assert templates.max() < scenario.templates


def test_higher_load_queues_more() -> None:
    cost = build_cost_model(image_tokens=64)
    scenarios = [
        Scenario(workers=4, jobs=2000, templates=40, cache_entries=4, target_load=load, seed=5) for load in (0.5, 0.95)
    ]
    rows, queued = run(scenarios, cost, skip_fraction=0.05)
    assert {(row.workers, row.load) for row in rows} == {(4, 0.5), (4, 0.95)}
    light, heavy = (
        next(row for row in rows if row.load == load and row.policy == "least_requests") for load in (0.5, 0.95)
    )
    assert heavy.arrival_rate_per_s == pytest.approx(light.arrival_rate_per_s * 0.95 / 0.5, abs=1e-3)
    assert heavy.mean_latency_s > light.mean_latency_s
    assert queued[(4, 0.95, "least_requests")] > queued[(4, 0.5, "least_requests")]
    margin = p95_margin(rows, 4, 0.95, "cost_affinity", "least_requests")
    affinity = next(row for row in rows if row.load == 0.95 and row.policy == "cost_affinity")
    assert margin == pytest.approx(1.0 - affinity.p95_latency_s / heavy.p95_latency_s)


@pytest.mark.parametrize("text", ["0.8,1.0", "0", "-0.5", "0.8,x", ""])
def test_loads_option_rejects_values_without_steady_state(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="0.8,0.9"):
        parse_loads(text)


def test_loads_option_accepts_fractions() -> None:
    assert parse_loads("0.8,0.95") == (0.8, 0.95)
