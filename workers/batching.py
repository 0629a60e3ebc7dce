"""Masked Flux edits through the process's step-level batching engine.

With EDITOR_ENGINE_MAX_BATCH above 1 the worker runs Celery's threads pool with that many job threads. Each
thread prepares its job (prompt and VAE encoding), hands the masked denoising to the one engine of its
model and decodes the result, so encoding and decoding overlap the engine's steps instead of stalling them.
Stock runs and warm-ups hold the model's lock, which the engine takes for each step.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from django.conf import settings

from workers.engine import Engine, EngineRequest
from workers.engine.stats import StepSample
from workers.families.base import MaskedOutput, StepCallback
from workers.masked.activations import BlockCacheSource, TemplateActivations
from workers.masked.edit import denoise_and_decode
from workers.masked.inference import MaskedDenoiseInputs
from workers.model_loading import LoadedModel

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
# Models whose first engine step in this process was left out of the cost model.
_first_step_seen: set[str] = set()


def batching_enabled(model: LoadedModel) -> bool:
    """Return whether this model's masked jobs go through the engine (it serves Flux Fill)."""
    return settings.EDITOR_ENGINE_MAX_BATCH > 1 and model.family.name == "flux"


def get_engine(model: LoadedModel) -> Engine:
    """Return the running engine of `model` in this process, started on first use."""
    with _lock:
        engine = _engines.get(model.name)
        if engine is None:
            engine = Engine(
                model.pipe, token_budget=settings.EDITOR_ENGINE_TOKEN_BUDGET,
                max_batch_size=settings.EDITOR_ENGINE_MAX_BATCH, pipeline_lock=model.lock,
                on_sample=lambda sample, name=model.name: record_step_cost(name, sample),
            )
            engine.start()
            _engines[model.name] = engine
            logger.info(
                "batching engine of %s started: up to %d requests, %d tokens per step",
                model.name, engine.max_batch_size, engine.token_budget,
            )
        return engine


def record_step_cost(model_name: str, sample: StepSample) -> None:
    """Add one engine step to the model's cost model: the tokens the step computed and its wall time.

    A job's own average step time would also count the steps of requests that joined its batch later, so on
    a batching worker the fit learns from whole engine steps instead. The process's first step is left out:
    it also packs the weights and allocates buffers. One such step took 3.0 s against 1.8 s for the same
    tokens later, and with few samples it tilted the fit so far that the router stopped using the worker.
    """
    from workers import worker_state  # imports the runner, which imports this module

    with _lock:
        first = model_name not in _first_step_seen
        _first_step_seen.add(model_name)
    if first:
        return

    costs = worker_state.loaded_cost_models().get(model_name)
    if costs is not None:
        costs.record_step(sample.tokens, sample.overhead_s + sample.compute_s)


def engines() -> dict[str, Engine]:
    with _lock:
        return dict(_engines)


def masked_edit(
    model: LoadedModel,
    activations: TemplateActivations,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    dilation: int,
    on_step: StepCallback | None = None,
    block_source: BlockCacheSource | None = None,
) -> MaskedOutput:
    """Prepare, denoise in the shared engine and decode one masked edit; exceptions of `on_step` propagate."""
    engine = get_engine(model)

    def denoise(inputs: MaskedDenoiseInputs) -> torch.Tensor:
        handle = engine.submit(
            EngineRequest(inputs=inputs, activations=activations, block_source=block_source, on_step=on_step)
        )
        # A cancel or time limit raises in `on_step` on the engine thread, which retires the request and hands
        # that exception to `result`.
        try:
            return handle.result()
        except BaseException:
            handle.cancel()  # an interrupted job thread leaves no orphan request in the batch
            raise

    edit = denoise_and_decode(
        model.pipe, image, mask, prompt, denoise,
        seed=seed, steps=steps, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, dilation=dilation,
    )
    return MaskedOutput(generated=edit.generated, latents=edit.latents)
