"""The worker's cost model: fits, persistence and calibration on a real (tiny) model."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.cost_model import CostFit, CostModel, calibrate, fit_line


def test_fit_line_rejects_negative_slopes():
    intercept, slope = fit_line([100, 200, 400], [0.3, 0.5, 0.9])
    assert intercept == pytest.approx(0.1)
    assert slope == pytest.approx(0.002)
    assert fit_line([100, 100], [0.2, 0.4]) == (0.0, pytest.approx(0.003))
    intercept, slope = fit_line([100, 200], [0.5, 0.4])
    assert intercept == 0.0
    assert slope > 0


def test_fit_line_clamps_negative_intercept():
    # Two calibration points whose line crosses zero below the origin: the fit goes through the origin.
    intercept, slope = fit_line([400, 1200], [0.2, 1.4])
    assert intercept == 0.0
    assert slope == pytest.approx((400 * 0.2 + 1200 * 1.4) / (400**2 + 1200**2))
    # A line with a positive fixed cost keeps it.
    assert fit_line([400, 1200], [0.6, 1.4]) == (pytest.approx(0.2), pytest.approx(0.001))


def test_model_refits_persists_and_reloads(tmp_path: Path):
    model = CostModel(tmp_path / "cost" / "flux.json", CostFit(0.0, 0.01))
    for tokens, seconds in ((200, 0.25), (400, 0.45), (800, 0.85)):
        model.record_step(tokens, seconds)
    model.record_load(8 * 2**20, 0.05)
    model.record_load(32 * 2**20, 0.17)
    fit = model.fit
    assert fit.step_intercept_s == pytest.approx(0.05)
    assert fit.step_s_per_token == pytest.approx(0.001)
    assert fit.load_s_per_mib == pytest.approx(0.005)
    assert fit.step_samples == 3
    assert fit.load_samples == 2
    assert fit.step_seconds(1000) == pytest.approx(1.05)

    again = CostModel.load(tmp_path / "cost" / "flux.json")
    assert again is not None and again.fit == fit
    assert CostModel.load(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert CostModel.load(tmp_path / "bad.json") is None


def test_nonsense_samples_are_ignored(tmp_path: Path):
    model = CostModel(tmp_path / "m.json", CostFit(0.1, 0.001))
    model.record_step(0, 1.0)
    model.record_step(100, -1.0)
    assert model.fit == CostFit(0.1, 0.001)


def test_metrics_name_the_model(tmp_path: Path):
    text = CostModel(tmp_path / "m.json", CostFit(0.02, 0.0005)).render_prometheus("fill")
    assert 'editor_cost_step_seconds_per_token{model="fill"} 0.0005' in text
    assert "# TYPE editor_cost_load_seconds_per_mib gauge" in text


def test_calibration_times_real_steps(tmp_path: Path, test_model_path: Path):
    from workers.model_loading import load_model

    model = load_model(str(test_model_path), var_dir=tmp_path)
    fitted = calibrate(model, tmp_path / "c.json", text_tokens=16, max_sequence_length=16)
    assert fitted.fit.step_samples == 2
    # More tokens never predict less time.
    assert fitted.fit.step_seconds(16 + 256) >= fitted.fit.step_seconds(16 + 64) > 0


def test_worker_loads_own_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from workers import worker_state

    monkeypatch.setenv("EDITOR_VAR_DIR", str(tmp_path))
    monkeypatch.setattr(worker_state, "_cost_models", {})
    calibrated = []
    monkeypatch.setattr(worker_state, "_calibrate_into", lambda target, *args: calibrated.append(target.path))
    fast = CostModel(worker_state.cost_model_path("w1@box", "flux"), CostFit(0.02, 0.001))
    fast.save()
    assert worker_state.cost_model_path("w1@box", "flux") != worker_state.cost_model_path("w2@box", "flux")
    assert worker_state.cost_model_path("a/../b", "flux").parent.parent == tmp_path / "cost-model"

    model = SimpleNamespace(name="flux")
    mine = worker_state.cost_model(model, hostname="w1@box", text_tokens=16, max_sequence_length=16)
    assert mine.fit.step_intercept_s == pytest.approx(0.02)
    assert calibrated == []

    # Another worker on the same machine starts from the prior and calibrates instead of taking w1's fit.
    monkeypatch.setattr(worker_state, "_cost_models", {})
    other = worker_state.cost_model(model, hostname="w2@box", text_tokens=16, max_sequence_length=16)
    assert other.fit == worker_state.PRIOR_FIT
    assert calibrated == [worker_state.cost_model_path("w2@box", "flux")]


def test_saves_are_spaced(tmp_path: Path):
    path = tmp_path / "flux.json"
    model = CostModel(path, CostFit(0.0, 0.01), save_interval_s=3600)
    model.record_step(200, 0.25)
    model.record_step(400, 0.45)

    # The first sample is written at once. The next waits for the interval, while the fit already contains it.
    assert model.fit.step_samples == 2
    assert CostModel.load(path).fit.step_samples == 1

    model.save()
    assert CostModel.load(path).fit.step_samples == 2
    assert CostModel.load(path, save_interval_s=5.0).save_interval_s == 5.0


def test_calibration_excludes_lock_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A warm-up holding the model while calibration waits must not count as step time."""
    from types import SimpleNamespace

    from workers import cost_model

    clock = [0.0]
    # Seconds each lock acquisition waits: the two-step run at the first size queues behind a warm-up.
    waits = iter([0.0, 30.0, 0.0, 0.0, 0.0, 0.0])

    class HeldLock:
        def __enter__(self):
            clock[0] += next(waits)

        def __exit__(self, *exc):
            return False

    def stock_edit(pipe, image, mask, prompt, *, steps, **kwargs):
        clock[0] += 0.5 + 0.001 * image.width * steps  # 0.5 s of set-up, then the steps

    monkeypatch.setattr(cost_model, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=lambda: 0.0,
                                                            monotonic=lambda: 0.0))
    model = SimpleNamespace(
        name="fake", lock=HeldLock(), pipe=None, working_multiple=16, token_pixels=16,
        family=SimpleNamespace(stock_edit=stock_edit),
    )
    fitted = calibrate(model, tmp_path / "c.json", text_tokens=16, max_sequence_length=16)
    steps = dict(fitted.step_samples())
    assert steps[16 + 64] == pytest.approx(0.128)
    assert steps[16 + 256] == pytest.approx(0.256)


def test_threads_share_one_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import threading
    from types import SimpleNamespace

    from workers import worker_state

    monkeypatch.setenv("EDITOR_VAR_DIR", str(tmp_path))
    monkeypatch.setattr(worker_state, "_cost_models", {})
    calibrations = []
    monkeypatch.setattr(worker_state, "_calibrate_into", lambda target, *args: calibrations.append(target))
    model = SimpleNamespace(name="flux")
    start = threading.Barrier(4)
    found = []

    def first_job() -> None:
        start.wait()
        found.append(worker_state.cost_model(model, hostname="w1@box", text_tokens=16, max_sequence_length=16))

    threads = [threading.Thread(target=first_job) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calibrations) == 1
    assert all(costs is calibrations[0] for costs in found)
