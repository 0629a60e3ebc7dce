"""Pure parts of the serving benchmark: trace generation, run metrics, headline and report files."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from bench.serving import (
    BASELINE,
    FULL_SYSTEM,
    KEEP_UP_FRACTION,
    PHOTO_SUFFIXES,
    PHOTOS,
    Completion,
    draw_mask_ratios,
    full_config,
    headline,
    markdown,
    make_row,
    make_trace,
    min_mask_ratio,
    quick_config,
    brush_mask,
    customized,
    summarize_run,
    template_images,
    unit_arrivals,
    write_report,
    zipf_weights,
)
from editing.imaging import mask_ratio

REQUIRED_ROW_KEYS = {"system", "mask_mean", "rate_rps", "throughput_rps", "mean_latency_s", "p95_latency_s"}


@pytest.mark.parametrize("mean", [0.11, 0.19])
@pytest.mark.parametrize("count", [8, 24, 2000])
def test_drawn_mask_ratios_have_the_target_mean(mean: float, count: int) -> None:
    ratios = draw_mask_ratios(np.random.default_rng(1), count, mean=mean, concentration=12.0, low=0.016, high=0.85)
    assert ratios.min() >= 0.016
    assert ratios.max() <= 0.85
    assert abs(ratios.mean() - mean) < 0.01
    # Spread like the distribution: Beta's standard deviation sqrt(m (1 - m) / (concentration + 1)).
    assert ratios.std() == pytest.approx(math.sqrt(mean * (1 - mean) / 13.0), rel=0.35)


@pytest.mark.parametrize("mean", [0.11, 0.19])
def test_built_masks_hit_the_drawn_token_ratios(mean: float) -> None:
    config = replace(quick_config(), size=256)
    trace = make_trace(config, mean, 40)
    built = [
        mask_ratio(brush_mask(r.mask_ratio, config.size, center=r.center, aspect=r.aspect), patch=16, dilation=1)
        for r in trace
    ]
    drawn = [r.mask_ratio for r in trace]
    # One token of 256 is 0.004. The brush lands within a few tokens of each target.
    assert max(abs(b - d) for b, d in zip(built, drawn)) < 0.03
    assert abs(np.mean(built) - np.mean(drawn)) < 0.01
    assert abs(np.mean(built) - mean) < 0.04


def test_min_mask_ratio_is_one_dilated_token() -> None:
    # A 256 px side has 16 tokens, and one token grown by one in every direction covers 9 of 256.
    assert min_mask_ratio(256) == pytest.approx(9 / 256)
    assert mask_ratio(brush_mask(min_mask_ratio(256), 256, center=(0.5, 0.5), aspect=1.0)) == pytest.approx(9 / 256)


def test_zipf_popularity_is_ordered_by_rank() -> None:
    weights = zipf_weights(8, 1.0)
    assert weights.sum() == pytest.approx(1.0)
    assert np.all(np.diff(weights) < 0)
    assert weights[0] / weights[1] == pytest.approx(2.0)
    trace = make_trace(replace(full_config(), templates=8), 0.11, 4000)
    counts = np.bincount([r.template for r in trace], minlength=8)
    assert np.all(np.diff(counts[:4]) < 0)
    assert counts[0] == counts.max()


def test_poisson_interarrival_mean_is_one_at_unit_rate() -> None:
    arrivals = unit_arrivals(np.random.default_rng(2), 20001)
    assert arrivals[0] == 0.0
    gaps = np.diff(arrivals)
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1.0)
    # Exponential gaps: the standard deviation equals the mean, and about 1 - 1/e of them are shorter than it.
    assert gaps.std() == pytest.approx(1.0, abs=0.05)
    assert np.mean(gaps < 1.0) == pytest.approx(1 - math.exp(-1), abs=0.02)


def test_short_trace_offers_the_nominal_rate() -> None:
    trace = make_trace(full_config(), 0.11, 24)
    assert trace[-1].unit_arrival_s == pytest.approx(23.0)


def test_trace_repeats_for_same_seed() -> None:
    config = full_config()
    assert make_trace(config, 0.11, 50) == make_trace(config, 0.11, 50)
    assert make_trace(config, 0.11, 50) != make_trace(config, 0.19, 50)
    assert make_trace(config, 0.11, 50) != make_trace(replace(config, seed=1), 0.11, 50)


def test_template_images_are_distinct_and_sized() -> None:
    images = template_images(8, 64)
    assert all(image.shape == (64, 64, 3) and image.dtype == np.uint8 for image in images)
    assert len({image.tobytes() for image in images}) == 8
    # Templates past the photo count are mirror images of the first photos.
    photos = sum(1 for path in PHOTOS.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    assert np.array_equal(images[photos], images[0][:, ::-1])


def completions(
    submits: list[float], finishes: list[float | None], statuses: list[str] | None = None
) -> list[Completion]:
    """Build completions: started 0.5 s after submission, even ones cache hits, denoise 100 ms x position."""
    statuses = statuses or ["succeeded" if f is not None else "unfinished" for f in finishes]
    return [
        Completion(
            submitted_at=s, status=st, finished_at=f, started_at=s + 0.5 if f is not None else None,
            cache_outcome="hit" if i % 2 == 0 else "bypass", mask_ratio=0.1, timings_ms={"denoise": 100.0 * (i + 1)},
        )
        for i, (s, f, st) in enumerate(zip(submits, finishes, statuses))
    ]


def test_run_metrics_from_synthetic_completions() -> None:
    submits = [100.0, 101.0, 102.0, 103.0, 104.0]
    finishes = [102.0, 104.0, 103.0, 107.0, 110.0]
    metrics = summarize_run(completions(submits, finishes))
    latencies = np.array(finishes) - np.array(submits)  # 2, 3, 1, 4, 6
    assert metrics.submitted == metrics.completed == 5
    assert metrics.throughput_rps == pytest.approx(5 / (110.0 - 100.0))
    assert metrics.offered_rps == pytest.approx(4 / 4.0)
    assert metrics.mean_latency_s == pytest.approx(latencies.mean())
    assert metrics.p95_latency_s == pytest.approx(np.percentile(latencies, 95))
    assert metrics.mean_latency_s <= metrics.p95_latency_s <= latencies.max()
    assert metrics.mean_queue_s == pytest.approx(0.5)
    assert metrics.cache_hit_share == pytest.approx(3 / 5)
    assert metrics.phase_ms["denoise"] == pytest.approx(300.0)
    # 0.5 jobs/s done against 1 job/s offered: the backlog grew.
    assert not metrics.kept_up


def test_kept_up_needs_every_job() -> None:
    submits = [0.0, 10.0, 20.0, 30.0]
    fast = summarize_run(completions(submits, [s + 1.0 for s in submits]))
    assert fast.throughput_rps >= KEEP_UP_FRACTION * fast.offered_rps
    assert fast.kept_up
    lost = summarize_run(completions(submits, [1.0, 11.0, 21.0, None]))
    assert lost.completed == 3
    assert lost.submitted == 4
    assert not lost.kept_up
    # Throughput counts completed jobs only.
    assert lost.throughput_rps == pytest.approx(3 / 21.0)


def test_run_without_completions_reports_nan_latency() -> None:
    metrics = summarize_run(completions([0.0, 1.0], [None, None], ["rejected", "unfinished"]))
    assert metrics.completed == 0
    assert metrics.throughput_rps == 0.0
    assert math.isnan(metrics.mean_latency_s)
    assert not metrics.kept_up


def synthetic_rows() -> list:
    """Build rows where the baseline keeps up at the two lower rates, and the full system at all three, faster."""
    rows = []
    for mean in (0.11, 0.19):
        for multiple, (base_done, base_finish, full_finish) in {
            0.5: (4, 1.0, 0.1), 1.0: (4, 2.0, 0.2), 4.0: (3, 30.0, 0.4),
        }.items():
            submits = [i * 10.0 / multiple for i in range(4)]
            base = completions(submits, [s + base_finish if i < base_done else None for i, s in enumerate(submits)])
            full = completions(submits, [s + full_finish for s in submits])
            rows.append(make_row(BASELINE, mean, multiple, 0.1 * multiple, summarize_run(base)))
            rows.append(make_row(FULL_SYSTEM, mean, multiple, 0.1 * multiple, summarize_run(full)))
    return rows


def test_headline_uses_highest_sustained_rate() -> None:
    rows = synthetic_rows()
    result = headline(rows, 0.11)
    base_at = next(r for r in rows if r.system == BASELINE and r.mask_mean == 0.11 and r.rate_multiple == 1.0)
    full_at = next(r for r in rows if r.system == FULL_SYSTEM and r.mask_mean == 0.11 and r.rate_multiple == 1.0)
    assert result.compared_rate_rps == pytest.approx(base_at.rate_rps)
    assert result.latency_ratio == pytest.approx(base_at.mean_latency_s / full_at.mean_latency_s, rel=0.01)
    base_max = max(r.throughput_rps for r in rows if r.system == BASELINE and r.mask_mean == 0.11 and r.completed == 4)
    full_max = max(r.throughput_rps for r in rows if r.system == FULL_SYSTEM and r.mask_mean == 0.11)
    assert result.throughput_ratio == pytest.approx(full_max / base_max, rel=0.01)


def test_headline_without_sustained_rate_uses_lowest() -> None:
    rows = [replace(row, kept_up=False) if row.system == BASELINE else row for row in synthetic_rows()]
    result = headline(rows, 0.19)
    lowest = min((r for r in rows if r.system == BASELINE and r.mask_mean == 0.19), key=lambda r: r.rate_rps)
    assert result.compared_rate_rps is None
    assert result.baseline_latency_s == lowest.mean_latency_s


def test_headline_without_overload_skips_throughput() -> None:
    rows = [row for row in synthetic_rows() if row.rate_multiple <= 1.0]
    result = headline(rows, 0.11)
    assert math.isnan(result.throughput_ratio)
    assert result.latency_ratio > 1
    text = markdown(rows, {"command": "c", "calibration_jobs": 4, "requests_per_rate": 4, "drain_timeout_s": 60,
                           "keep_up_rule": "r", "systems": {BASELINE: {}, FULL_SYSTEM: {}}}, [result])
    assert "not measured (the baseline kept up at every rate)" in text


def test_report_files_have_the_required_keys(tmp_path) -> None:
    rows = synthetic_rows()
    env = {"command": "python -m bench.serving", "calibration_jobs": 4, "requests_per_rate": 4, "drain_timeout_s": 60,
           "keep_up_rule": "rule", "systems": {BASELINE: {"EDITOR_CACHE_ENABLED": "0"},
                                               FULL_SYSTEM: {"EDITOR_CACHE_ENABLED": "1"}}}
    headlines = write_report(rows, env, tmp_path)
    data = json.loads((tmp_path / "serving.json").read_text())
    assert len(data) == len(rows)
    assert all(REQUIRED_ROW_KEYS <= set(row) for row in data)
    assert {row["system"] for row in data} == {BASELINE, FULL_SYSTEM}
    assert json.loads((tmp_path / "serving.environment.json").read_text()) == env
    text = (tmp_path / "serving.md").read_text()
    assert "## Mask ratio mean 0.11" in text
    assert "## Mask ratio mean 0.19" in text
    assert f"{headlines[0].latency_ratio:.2f}x" in text
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def options(**given: object) -> argparse.Namespace:
    names = ("requests", "rates", "mask_means", "systems", "out_dir", "preset", "size", "steps", "warm_on")
    return argparse.Namespace(**{name: given.get(name) for name in names})


def test_model_options_change_the_config() -> None:
    config = customized(full_config(), options(preset="bench", size=512, steps=8))
    assert (config.preset, config.size, config.steps) == ("bench", 512, 8)
    assert customized(full_config(), options()) == full_config()
    assert full_config().warm_on == "every"
    assert customized(full_config(), options(warm_on="one")).warm_on == "one"
    assert customized(full_config(), options(mask_means="0.11")).mask_means == (0.11,)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"preset": "huge"}, "--preset 'huge'"),
        ({"size": 500}, "--size 500"),
        ({"size": 2048}, "--size 2048"),
        ({"steps": 0}, "--steps 0"),
        ({"rates": "fast"}, "--rates 'fast'"),
        ({"systems": "masked"}, "--systems 'masked'"),
        ({"mask_means": "small"}, "--mask-means 'small'"),
        ({"mask_means": "0.11,0.9"}, "--mask-means '0.11,0.9'"),
    ],
)
def test_bad_options_exit_naming_the_value(given: dict, named: str) -> None:
    with pytest.raises(SystemExit) as raised:
        customized(full_config(), options(**given))
    assert named in str(raised.value)
