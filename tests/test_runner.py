"""Tests for model loading and the stock full-compute edit runner, on the tiny 'test' demo model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from django.conf import settings

if not settings.configured:
    settings.configure(USE_I18N=True)

from editing.imaging import dilate  # noqa: E402  (settings must exist before gettext runs)
from workers import model_loading  # noqa: E402
from workers.demo_model import build_flux_fill_demo  # noqa: E402
from editing.catalog import parse_models  # noqa: E402
from workers.model_loading import LoadedModel, folder_revision, get_model, load_model  # noqa: E402
from workers.runner import EditRequest, EditResult, JobCancelled, RunnerSettings, run_edit  # noqa: E402

STEPS = 3
SETTINGS = RunnerSettings(max_work_pixels=1024 * 1024, feather_px=4, dilate_px=0, max_sequence_length=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux_fill_demo(tmp_path_factory.mktemp("runner-model") / "test", preset="test", seed=0)


@pytest.fixture(scope="module")
def model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(model_dir), var_dir=tmp_path_factory.mktemp("var"))


@pytest.fixture(scope="module")
def edit_451x300(model: LoadedModel) -> tuple[EditRequest, EditResult]:
    request = _request()
    return request, run_edit(model, request, settings=SETTINGS)


def _request(height: int = 300, width: int = 451, *, seed: int = 0) -> EditRequest:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 3 : height // 2, width // 4 : width // 2] = True
    return EditRequest(image=image, mask=mask, prompt="a red apple", seed=seed, steps=STEPS, guidance=30.0)


# ---------------------------------------------------------------------------------------------------------------
# Model loading


def test_load_model_local_folder(model: LoadedModel, model_dir: Path) -> None:
    assert model.model_id == str(model_dir.resolve())
    assert model.revision == folder_revision(model_dir)
    assert model.revision.startswith("local-")
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert model.family.name == "flux"
    assert model.name == "flux"
    assert model.pipe.transformer.config.in_channels == 384


def test_folder_revision_follows_config(tmp_path: Path, model_dir: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model_index.json").write_text((model_dir / "model_index.json").read_text())
    before = folder_revision(copy)

    index = json.loads((copy / "model_index.json").read_text())
    index["_diffusers_version"] = "0.0.0"
    (copy / "model_index.json").write_text(json.dumps(index))

    assert folder_revision(copy) != before
    assert folder_revision(model_dir) == folder_revision(model_dir)


def test_load_model_demo_builds_under_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built: list[tuple[Path, str]] = []

    def fake_ensure(root: Path, preset: str = "demo", *, builder, folder_name: str) -> Path:
        built.append((root, folder_name))
        return build_flux_fill_demo(tmp_path / "built", preset="test")

    monkeypatch.setattr(model_loading, "ensure_demo_model", fake_ensure)

    loaded = load_model(None, var_dir=tmp_path / "var")

    assert built == [(tmp_path / "var" / "models", "demo")]
    assert loaded.model_id == "demo"


def test_get_model_loads_once_across_threads(monkeypatch: pytest.MonkeyPatch, model: LoadedModel, settings) -> None:
    calls: list[str] = []
    release = threading.Event()

    def fake_load(model_ref: str | None, *, var_dir: Path, family: str, name: str) -> LoadedModel:
        calls.append(f"{name}={family}:{model_ref}")
        release.wait(timeout=10)
        return model

    monkeypatch.setattr(model_loading, "load_model", fake_load)
    settings.EDITOR_MODELS = parse_models("fill=flux:/models/some-flux-fill,other=sd2:demo")
    model_loading.reset_process_model()
    results: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: results.append(get_model())) for _ in range(4)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    model_loading.reset_process_model()

    assert calls == ["fill=flux:/models/some-flux-fill"]
    assert len(results) == 4
    assert all(result is model for result in results)


# ---------------------------------------------------------------------------------------------------------------
# Runner


def test_run_edit_keeps_451x300_size(edit_451x300: tuple[EditRequest, EditResult]) -> None:
    _, result = edit_451x300

    assert result.image.shape == (300, 451, 3)
    assert result.image.dtype == np.uint8
    assert result.working_size == (464, 304)
    assert set(result.timings_ms) == {"preprocess", "denoise", "decode", "composite"}


def test_run_edit_outside_mask_is_identical(edit_451x300: tuple[EditRequest, EditResult]) -> None:
    request, result = edit_451x300

    outside = ~dilate(request.mask, SETTINGS.keep_px)
    assert np.array_equal(result.image[outside], request.image[outside])
    assert not np.array_equal(result.image[request.mask], request.image[request.mask])


def test_run_edit_is_seed_deterministic(model: LoadedModel) -> None:
    first = run_edit(model, _request(64, 80, seed=1), settings=SETTINGS)
    again = run_edit(model, _request(64, 80, seed=1), settings=SETTINGS)
    other = run_edit(model, _request(64, 80, seed=2), settings=SETTINGS)

    assert np.array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)


def test_run_edit_downscales_to_work_limit(model: LoadedModel) -> None:
    request = _request()
    small = RunnerSettings(max_work_pixels=128 * 128, feather_px=4, dilate_px=2, max_sequence_length=32)

    result = run_edit(model, request, settings=small)

    width, height = result.working_size
    assert width % 16 == 0
    assert height % 16 == 0
    assert width * height <= 128 * 128
    assert result.image.shape == (300, 451, 3)
    outside = ~dilate(request.mask, small.keep_px)
    assert np.array_equal(result.image[outside], request.image[outside])


def test_run_edit_reports_every_step(model: LoadedModel) -> None:
    progress: list[tuple[int, int]] = []

    run_edit(model, _request(48, 48), on_step=lambda done, total: progress.append((done, total)), settings=SETTINGS)

    assert progress == [(1, STEPS), (2, STEPS), (3, STEPS)]


def test_run_edit_propagates_job_cancelled(model: LoadedModel) -> None:
    progress: list[int] = []

    def cancel_at_two(done: int, total: int) -> None:
        progress.append(done)
        if done == 2:
            raise JobCancelled("cancelled at step 2")

    with pytest.raises(JobCancelled, match="step 2"):
        run_edit(model, _request(48, 48), on_step=cancel_at_two, settings=SETTINGS)

    assert progress == [1, 2]


def test_run_edit_rejects_mask_shape_mismatch(model: LoadedModel) -> None:
    request = _request(48, 48)
    request.mask = np.ones((48, 40), dtype=bool)

    with pytest.raises(ValueError, match="request.mask"):
        run_edit(model, request, settings=SETTINGS)


def test_runner_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITOR_MAX_WORK_PIXELS", "65536")
    monkeypatch.setenv("EDITOR_FEATHER_PX", "3")
    monkeypatch.delenv("EDITOR_MASK_DILATE_PX", raising=False)
    monkeypatch.delenv("EDITOR_MAX_SEQUENCE_LENGTH", raising=False)

    loaded = RunnerSettings.from_env()

    assert loaded == RunnerSettings(max_work_pixels=65536, feather_px=3, dilate_px=0, max_sequence_length=128)


def test_runner_settings_reject_bad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITOR_FEATHER_PX", "wide")

    with pytest.raises(ValueError, match="EDITOR_FEATHER_PX='wide'"):
        RunnerSettings.from_env()
