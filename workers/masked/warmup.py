"""Warm-up: one stock Flux Fill run on an unmasked template that records activations for masked edits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from workers.masked.activations import VARIANTS, ActivationsMetadata, BlockActivations, TemplateActivations, Variant
from workers.masked.conditioning import PromptEmbedding, encode_prompt, token_grid
from workers.masked.processors import ActivationRecorder, RecordingFluxAttnProcessor, StepCursor
from workers.masked.transformer_blocks import processor_names

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def to_pil_image(image: np.ndarray | Image.Image) -> Image.Image:
    """Convert a uint8 (H, W, 3) array to an RGB PIL image. PIL images are converted to RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a uint8 array of shape (H, W, 3), got {array.dtype} {array.shape}.")
    return Image.fromarray(array, mode="RGB")


def warm_up_template(
    pipe: FluxFillPipeline,
    image: np.ndarray | Image.Image,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    variant: Variant = "kv",
    prompt: str | PromptEmbedding = "",
    max_sequence_length: int = 512,
    on_progress: ProgressCallback | None = None,
) -> TemplateActivations:
    """Run the stock pipeline on `image` with nothing masked and record activations of every step and block.

    The request's seed, steps, guidance and resolution must equal the ones used here for the cache to apply.
    `on_progress(done, total)` is called after each denoising step.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    template = to_pil_image(image)
    width, height = template.size
    grid = token_grid(pipe, height, width)
    embedding = prompt if isinstance(prompt, PromptEmbedding) else encode_prompt(pipe, prompt, max_sequence_length)
    warmup_prompt = "" if isinstance(prompt, PromptEmbedding) else prompt

    transformer = pipe.transformer
    names = processor_names(transformer)
    cursor = StepCursor()
    recorder = ActivationRecorder(variant, steps, len(names), grid[0] * grid[1])
    latent_width = pipe.vae.config.latent_channels * 4
    trajectory: list[torch.Tensor] = []

    def record_input_latents(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # The pipeline feeds cat(latents, conditioning) on the channel axis; keep the latents (N_img, 64).
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cursor.step = len(trajectory)
        trajectory.append(hidden_states[0, :, :latent_width].clone())

    def report_step(_pipe: FluxFillPipeline, index: int, _t: torch.Tensor, _tensors: dict) -> dict:
        if on_progress is not None:
            on_progress(index + 1, steps)
        return {}

    original = transformer.attn_processors
    transformer.set_attn_processor(
        {name: RecordingFluxAttnProcessor(block, cursor, recorder) for block, name in enumerate(names)}
    )
    hook = transformer.register_forward_pre_hook(record_input_latents, with_kwargs=True)
    try:
        with torch.inference_mode():
            output = pipe(
                prompt_embeds=embedding.prompt_embeds,
                pooled_prompt_embeds=embedding.pooled_prompt_embeds,
                image=template,
                mask_image=Image.new("L", template.size, 0),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                max_sequence_length=max_sequence_length,
                output_type="latent",
                callback_on_step_end=report_step,
            )
    finally:
        hook.remove()
        transformer.set_attn_processor(original)

    final_latents = output.images[0]
    trajectory.append(final_latents.clone())
    blocks = _complete_blocks(recorder)
    metadata = ActivationsMetadata(
        variant=variant,
        num_steps=steps,
        num_blocks=len(names),
        num_double_blocks=len(transformer.transformer_blocks),
        grid=grid,
        dtype=final_latents.dtype,
        seed=seed,
        guidance_scale=float(guidance_scale),
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        warmup_prompt=warmup_prompt,
    )
    activations = TemplateActivations(metadata=metadata, latents=torch.stack(trajectory), blocks=blocks)
    logger.info(
        "Recorded %s activations: %d steps x %d blocks, %d image tokens, %.1f MiB",
        variant,
        steps,
        len(names),
        grid[0] * grid[1],
        activations.nbytes / 2**20,
    )
    return activations


def _complete_blocks(recorder: ActivationRecorder) -> list[list[BlockActivations]]:
    blocks: list[list[BlockActivations]] = []
    for step, step_blocks in enumerate(recorder.blocks):
        missing = [block for block, entry in enumerate(step_blocks) if entry is None]
        if missing:
            raise RuntimeError(f"Warm-up recorded no activations for step {step}, blocks {missing}.")
        blocks.append([entry for entry in step_blocks if entry is not None])
    return blocks
