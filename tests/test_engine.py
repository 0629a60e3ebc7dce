"""Continuous batching engine against one-request-at-a-time `denoise_masked` on a tiny re-initialized model (fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline

from tests.test_masked_inference import (
    GRID,
    TOLERANCE,
    ShiftedBlockSource,
    ShiftedStepSource,
    build_tiny_pipeline,
    pixel_mask,
    relative_difference,
    template_image,
)
from workers.engine import CacheLookupError, Engine, EngineRequest, RequestCancelled, RequestStatus
from workers.masked import weight_packing
from workers.masked.activations import BlockActivations, TemplateActivations
from workers.masked.conditioning import PromptEmbedding, embedding_from_tensors
from workers.masked.inference import MaskedDenoiseInputs, denoise_masked, prepare_masked_inputs
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import warm_up_template


@dataclass(frozen=True)
class Case:
    """One edit request and its reference result from `denoise_masked`."""

    activations: TemplateActivations
    inputs: MaskedDenoiseInputs
    expected: torch.Tensor

    def request(self, **kwargs: object) -> EngineRequest:
        return EngineRequest(inputs=self.inputs, activations=self.activations, **kwargs)  # type: ignore[arg-type]


def random_embedding(pipe: FluxFillPipeline, seed: int, text_tokens: int) -> PromptEmbedding:
    generator = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(1, text_tokens, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    return embedding_from_tensors(pipe, prompt_embeds, pooled)


def token_rectangle(top: int, left: int, rows: int, cols: int) -> np.ndarray:
    mask = np.zeros((GRID, GRID), dtype=bool)
    mask[top : top + rows, left : left + cols] = True
    return mask


@pytest.fixture(scope="module")
def pipe() -> FluxFillPipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def templates(pipe: FluxFillPipeline) -> dict[str, TemplateActivations]:
    """Two templates with different seeds, steps, guidance and cache variants."""
    return {
        "a": warm_up_template(
            pipe,
            template_image(0),
            seed=7,
            steps=3,
            guidance_scale=30.0,
            variant="kv",
            prompt=random_embedding(pipe, 11, 8),
        ),
        "b": warm_up_template(
            pipe,
            template_image(1),
            seed=5,
            steps=4,
            guidance_scale=3.5,
            variant="hidden",
            prompt=random_embedding(pipe, 12, 8),
        ),
    }


@pytest.fixture(scope="module")
def cases(pipe: FluxFillPipeline, templates: dict[str, TemplateActivations]) -> list[Case]:
    """Four edits with new prompts (5 to 8 text tokens) and mask ratios from 4/36 to 20/36."""
    specs = [
        ("a", 0, token_rectangle(1, 1, 2, 2), 21, 8),
        ("b", 1, token_rectangle(0, 0, 3, 3), 22, 5),
        ("a", 0, token_rectangle(2, 1, 1, 4), 23, 8),
        ("b", 1, token_rectangle(1, 1, 5, 4), 24, 6),
    ]
    result = []
    for name, image_seed, token_mask, prompt_seed, text_tokens in specs:
        activations = templates[name]
        metadata = activations.metadata
        inputs = prepare_masked_inputs(
            pipe,
            template_image(image_seed),
            pixel_mask(token_mask),
            random_embedding(pipe, prompt_seed, text_tokens),
            TokenLayout.from_token_mask(token_mask),
            seed=metadata.seed,
            steps=metadata.num_steps,
            guidance_scale=metadata.guidance_scale,
        )
        result.append(Case(activations, inputs, denoise_masked(pipe, activations, inputs)))
    return result


def test_batched_matches_unbatched_with_joins(pipe, cases) -> None:
    engine = Engine(pipe)
    handles = [engine.submit(case.request()) for case in cases[:2]]
    engine.step()
    engine.step()
    handles += [engine.submit(case.request()) for case in cases[2:]]
    engine.run_until_idle()

    for handle, case in zip(handles, cases):
        masked = case.inputs.layout.masked
        result = handle.result(timeout=0)
        assert relative_difference(result, case.expected) < TOLERANCE
        assert relative_difference(result[masked], case.expected[masked]) < TOLERANCE
        # The edits change the image, so matching the reference is not matching the template.
        assert relative_difference(case.expected[masked], case.activations.latents[-1][masked]) > 0.05
    assert engine.stats.batch_sizes[:3] == [2, 2, 4]
    assert [sample.admitted for sample in engine.stats.samples()][:3] == [2, 0, 2]
    assert engine.stats.steps_run == len(engine.stats.overhead_s)
    assert all(overhead >= 0 for overhead in engine.stats.overhead_s)


def test_engine_uses_packed_weights(pipe, cases, monkeypatch) -> None:
    """A packed copy 5% off its weight must show in the engine's result, so the engine runs on packed copies."""
    if not weight_packing.mkl_packing_available():
        pytest.skip("this PyTorch build has no MKL packed GEMM")
    pack = weight_packing.pack_weight
    monkeypatch.setattr(weight_packing, "MIN_PACKED_ROWS", 1)
    monkeypatch.setattr(weight_packing, "pack_weight", lambda weight: pack(weight * 1.05))
    weight_packing.forget_packed_copies()
    try:
        engine = Engine(pipe)
        handle = engine.submit(cases[0].request())
        engine.run_until_idle()
        result = handle.result(timeout=0)
    finally:
        weight_packing.forget_packed_copies()

    assert relative_difference(result, cases[0].expected) > 100 * TOLERANCE


@pytest.mark.parametrize("wrong_index", [0, 1])  # a "kv" and a "hidden" cache
@pytest.mark.parametrize("wrong_source", [ShiftedStepSource, ShiftedBlockSource])
def test_wrong_cache_breaks_only_its_request(pipe, cases, wrong_index, wrong_source) -> None:
    engine = Engine(pipe)
    wrong = cases[wrong_index]
    handles = [
        engine.submit(case.request(block_source=wrong_source(case.activations) if case is wrong else None))
        for case in cases
    ]
    engine.run_until_idle()

    for handle, case in zip(handles, cases):
        masked = case.inputs.layout.masked
        difference = relative_difference(handle.result(timeout=0)[masked], case.expected[masked])
        if case is wrong:
            assert difference > 100 * TOLERANCE
        else:
            assert difference < TOLERANCE


def test_budget_and_batch_size_respected(pipe, cases) -> None:
    first, second, third = cases[:3]
    budget = first.request().num_tokens + second.request().num_tokens
    engine = Engine(pipe, token_budget=budget, max_batch_size=3)
    handles = [engine.submit(case.request()) for case in (first, second, third)]
    engine.step()

    statuses = [handle.status for handle in handles]
    assert statuses == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING]
    engine.run_until_idle()
    assert max(engine.stats.tokens_per_step) <= budget
    assert engine.stats.batch_sizes[0] == 2
    assert relative_difference(handles[2].result(timeout=0), third.expected) < TOLERANCE

    single = Engine(pipe, max_batch_size=1)
    for case in cases[:2]:
        single.submit(case.request())
    single.run_until_idle()
    assert set(single.stats.batch_sizes) == {1}


def test_step_samples_feed_cost_model(pipe, cases, tmp_path, monkeypatch) -> None:
    from workers import batching, worker_state
    from workers.cost_model import CostFit, CostModel

    costs = CostModel(tmp_path / "flux.json", CostFit(0.0, 1.0))
    monkeypatch.setattr(worker_state, "loaded_cost_models", lambda: {"flux": costs})
    monkeypatch.setattr(batching, "_first_step_seen", set())
    observed = []

    def observe(sample) -> None:
        observed.append(sample)
        batching.record_step_cost("flux", sample)

    engine = Engine(pipe, on_sample=observe)
    first, second = cases[:2]
    engine.submit(first.request())
    engine.step()
    engine.submit(second.request())
    engine.run_until_idle()

    assert observed == engine.stats.samples()
    assert observed[0].tokens == first.request().num_tokens
    assert observed[1].tokens == first.request().num_tokens + second.request().num_tokens
    # The process's first step, which also packs the weights, is left out of the fit.
    recorded = costs.step_samples()
    assert [tokens for tokens, _ in recorded] == [float(sample.tokens) for sample in observed[1:]]
    assert [seconds for _, seconds in recorded] == [sample.overhead_s + sample.compute_s for sample in observed[1:]]
    assert costs.fit.step_samples == len(observed) - 1


def test_failing_observer_keeps_engine_running(pipe, cases) -> None:
    def broken(_sample) -> None:
        raise RuntimeError("observer failed")

    engine = Engine(pipe, on_sample=broken)
    handle = engine.submit(cases[0].request())
    engine.run_until_idle()
    assert relative_difference(handle.result(timeout=0), cases[0].expected) < TOLERANCE


def test_submit_rejects_request_over_budget(pipe, cases) -> None:
    engine = Engine(pipe, token_budget=cases[0].request().num_tokens - 1)

    with pytest.raises(ValueError, match="token_budget"):
        engine.submit(cases[0].request())


def test_progress_and_cancel_at_boundary(pipe, cases) -> None:
    progress: dict[str, list[tuple[int, int]]] = {"completed": [], "cancelled": []}
    engine = Engine(pipe)
    completed = engine.submit(
        cases[0].request(on_step=lambda done, total: progress["completed"].append((done, total)))
    )
    cancelled = engine.submit(cases[1].request(on_step=lambda done, total: progress["cancelled"].append((done, total))))
    never_started = engine.submit(cases[2].request())
    never_started.cancel()
    engine.step()
    cancelled.cancel()
    engine.run_until_idle()

    with pytest.raises(RequestCancelled):
        cancelled.result(timeout=0)
    with pytest.raises(RequestCancelled):
        never_started.result(timeout=0)
    assert progress["cancelled"] == [(1, 4)]
    assert progress["completed"] == [(1, 3), (2, 3), (3, 3)]
    assert relative_difference(completed.result(timeout=0), cases[0].expected) < TOLERANCE
    assert not completed.cancel()


class CallbackFailure(RuntimeError):
    pass


class FailingSource:
    """Cache source that fails from `fail_at_step` on, as a missing cache file would."""

    def __init__(self, activations: TemplateActivations, fail_at_step: int) -> None:
        self._activations = activations
        self._fail_at_step = fail_at_step

    def get(self, step: int, block: int) -> BlockActivations:
        if step >= self._fail_at_step:
            raise FileNotFoundError(f"no cached activations for step {step}")
        return self._activations.get(step, block)


def test_failure_retires_only_its_request(pipe, cases) -> None:
    def fail_on_second_step(done: int, _total: int) -> None:
        if done == 2:
            raise CallbackFailure("callback failed")

    engine = Engine(pipe)
    callback_failed = engine.submit(cases[0].request(on_step=fail_on_second_step))
    cache_failed = engine.submit(cases[1].request(block_source=FailingSource(cases[1].activations, fail_at_step=1)))
    healthy = [engine.submit(case.request()) for case in cases[2:]]
    engine.run_until_idle()

    with pytest.raises(CallbackFailure):
        callback_failed.result(timeout=0)
    with pytest.raises(CacheLookupError) as raised:
        cache_failed.result(timeout=0)
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    for handle, case in zip(healthy, cases[2:]):
        assert relative_difference(handle.result(timeout=0), case.expected) < TOLERANCE


def test_background_thread_serves_requests(pipe, cases) -> None:
    engine = Engine(pipe)
    engine.start()
    try:
        handles = [engine.submit(case.request()) for case in cases[:2]]
        results = [handle.result(timeout=30) for handle in handles]
    finally:
        engine.stop()

    for result, case in zip(results, cases[:2]):
        assert relative_difference(result, case.expected) < TOLERANCE
    assert engine.num_active == 0
    assert engine.num_waiting == 0
