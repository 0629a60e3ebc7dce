"""SD3 and the UNet families through the worker's own path: load by name, warm up, store, hit, edit, composite."""

from __future__ import annotations

import numpy as np
import pytest

from editing.imaging import dilate, read_template
from editing.models import CacheOutcome
from tests.conftest import PHOTOS
from workers import caching
from workers.families import get_family
from workers.model_loading import load_model
from workers.runner import EditRequest, RunnerSettings, prepare_working_inputs, run_edit

STEPS = 2
SETTINGS = RunnerSettings(max_sequence_length=16)


@pytest.fixture
def store(cache_store):
    return cache_store


@pytest.fixture(scope="module")
def template() -> np.ndarray:
    image = read_template((PHOTOS / "chelsea.png").read_bytes(), max_pixels=10**7, max_bytes=10**8)
    return np.ascontiguousarray(image[:128, :192])


@pytest.fixture(scope="module", params=["sd3", "sd2", "sdxl"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"{request.param}-test")
    get_family(request.param).build_demo(folder, "test")
    return load_model(str(folder), var_dir=folder.parent, family=request.param, name=f"{request.param}-test")


def test_warmed_template_serves_masked_edit(model, store, template):
    inputs = caching.working_template(model, template, SETTINGS)
    mask = np.zeros(template.shape[:2], dtype=bool)
    mask[40:80, 60:120] = True
    outside = ~dilate(mask, SETTINGS.keep_px)
    request = EditRequest(image=template, mask=mask, prompt="a red ball", seed=0, steps=STEPS, guidance=5.0)
    images = {}
    for variant in model.family.variants:
        key = caching.job_cache_key(
            model, inputs, template_hash=f"hash-{model.name}", steps=STEPS, seed=0, guidance=5.0,
            variant=variant, settings=SETTINGS,
        )
        outcome = caching.warm_template(model, inputs, key, settings=SETTINGS)
        assert outcome.nbytes > 0

        decision = caching.decide(model, key, 0.3, pending_same_key=0)
        assert decision.outcome == CacheOutcome.HIT
        assert decision.activations.metadata.num_steps == STEPS
        assert decision.activations.metadata.variant == variant

        steps_seen: list[int] = []
        result = run_edit(
            model, request, on_step=lambda done, total: steps_seen.append(done), settings=SETTINGS,
            activations=decision.activations,
        )
        images[variant] = result.image

        assert result.image.shape == template.shape
        assert steps_seen == list(range(1, STEPS + 1))
        assert np.array_equal(result.image[outside], template[outside])
        assert not np.array_equal(result.image[mask], template[mask])
        assert {"preprocess", "denoise", "decode", "composite"} <= set(result.timings_ms)

    # Both variants hold the same information, so their edits agree up to rounding of the decoded pixels.
    for image in images.values():
        difference = np.abs(image.astype(int) - images[model.family.variants[0]].astype(int))
        assert difference.max() <= 1


def test_flop_fraction_comes_from_the_family(model, template):
    mask = np.zeros(template.shape[:2], dtype=bool)
    mask[40:80, 60:120] = True
    variant = model.family.variants[0]
    small = prepare_working_inputs(template, mask, SETTINGS.max_work_pixels, model.working_multiple)
    full = prepare_working_inputs(template, np.ones_like(mask), SETTINGS.max_work_pixels, model.working_multiple)

    fraction = caching.masked_flop_fraction(model, small, variant=variant, settings=SETTINGS)
    assert 0 < fraction < 1
    assert caching.masked_flop_fraction(model, full, variant=variant, settings=SETTINGS) == pytest.approx(1.0)
