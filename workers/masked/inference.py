"""Masked Flux Fill inference: recompute only masked image tokens and reuse a template's cached activations."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxFillPipeline
from PIL import Image

from workers.masked.activations import ActivationsMetadata, BlockCacheSource, InMemoryBlockCacheSource, TemplateActivations
from workers.masked.conditioning import (
    PromptEmbedding,
    guidance_tensor,
    latent_image_ids,
    prepare_fill_conditioning,
    prepare_timesteps,
    skip_initial_draws,
)
from workers.masked.processors import CachedFluxAttnProcessor, RotaryEmbedding, StepCursor, UnmaskedTokens
from workers.masked.step_tables import step_tables
from workers.masked.text_keys import text_keys_only
from workers.masked.token_layout import TokenLayout
from workers.masked.transformer_blocks import blocks_in_order, swap_attention_processors
from workers.masked.weight_packing import packed_linears

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class MaskedDenoiseInputs:
    """Request-specific inputs of one masked denoising run.

    `conditioning` has shape (1, N_img, 320): Flux Fill masked-image latents and mask channels of all tokens.
    """

    embedding: PromptEmbedding
    conditioning: torch.Tensor
    layout: TokenLayout
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int


def check_compatible(metadata: ActivationsMetadata, inputs: MaskedDenoiseInputs, dtype: torch.dtype) -> None:
    """Raise ValueError when cached activations were recorded with settings other than the request's."""
    expected = {
        "seed": (metadata.seed, inputs.seed),
        "steps": (metadata.num_steps, inputs.steps),
        "guidance_scale": (metadata.guidance_scale, float(inputs.guidance_scale)),
        "height": (metadata.height, inputs.height),
        "width": (metadata.width, inputs.width),
        "token grid": (metadata.grid, inputs.layout.grid),
        "dtype": (metadata.dtype, dtype),
    }
    for name, (cached, requested) in expected.items():
        if cached != requested:
            raise ValueError(
                f"Request {name}={requested!r} does not match the cached activations ({cached!r}). "
                "Warm the template up again with the request's settings."
            )


def prepare_masked_inputs(
    pipe: FluxFillPipeline,
    image: Image.Image,
    mask: Image.Image,
    embedding: PromptEmbedding,
    layout: TokenLayout,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
) -> MaskedDenoiseInputs:
    """VAE-encode the request's masked image into Flux Fill conditioning on the stock random stream."""
    width, height = image.size
    dtype = embedding.prompt_embeds.dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    skip_initial_draws(pipe, generator, height, width, dtype)
    conditioning = prepare_fill_conditioning(pipe, image, mask, generator, dtype)
    return MaskedDenoiseInputs(
        embedding=embedding,
        conditioning=conditioning,
        layout=layout,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
    )


def denoise_masked(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    inputs: MaskedDenoiseInputs,
    *,
    full_prefix_blocks: int = 0,
    block_source: BlockCacheSource | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise the masked tokens and return the final packed latents (N_img, 64) of the whole image.

    The first `full_prefix_blocks` blocks of every step run on all tokens, taking the unmasked tokens' latents
    from the cached trajectory. The remaining blocks run on text and masked tokens, which attend to cached K/V of
    the unmasked tokens. With `full_prefix_blocks` >= the number of blocks this is the stock computation.

    NOTE: this swaps the transformer's attention processors for the duration of the call, so callers must not
    run two requests on one pipeline at the same time (the worker runner acquires `LoadedModel.lock`).
    """
    transformer = pipe.transformer
    total_blocks = len(blocks_in_order(transformer))
    if full_prefix_blocks < 0:
        raise ValueError(f"full_prefix_blocks must be >= 0, got {full_prefix_blocks}.")
    check_compatible(activations.metadata, inputs, inputs.embedding.prompt_embeds.dtype)
    source = block_source if block_source is not None else InMemoryBlockCacheSource(activations)

    with torch.inference_mode():
        if full_prefix_blocks >= total_blocks:
            return _denoise_all_tokens(pipe, activations.latents[0], inputs, on_step)
        return _denoise_masked_tokens(pipe, activations, inputs, full_prefix_blocks, source, on_step)


def _denoise_all_tokens(
    pipe: FluxFillPipeline, initial_latents: torch.Tensor, inputs: MaskedDenoiseInputs, on_step: StepCallback | None
) -> torch.Tensor:
    """Run the stock denoising loop on all tokens with the stock processors."""
    embedding = inputs.embedding
    timesteps = prepare_timesteps(pipe, inputs.height, inputs.width, inputs.steps)
    guidance = guidance_tensor(pipe, inputs.guidance_scale)
    image_ids = latent_image_ids(pipe, inputs.height, inputs.width, embedding.prompt_embeds.dtype)
    latents = initial_latents.unsqueeze(0)
    for index, t in enumerate(timesteps):
        hidden_states = torch.cat((latents, inputs.conditioning), dim=2)
        noise_pred = predict_noise(pipe.transformer, hidden_states, t, guidance, embedding, image_ids)
        latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(index + 1, inputs.steps)
    return latents[0]


def _denoise_masked_tokens(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    inputs: MaskedDenoiseInputs,
    full_prefix_blocks: int,
    source: BlockCacheSource,
    on_step: StepCallback | None,
) -> torch.Tensor:
    transformer = pipe.transformer
    embedding = inputs.embedding
    layout = inputs.layout
    masked = layout.masked.to(activations.latents.device)
    unmasked = layout.unmasked.to(activations.latents.device)
    trajectory = activations.latents

    timesteps = prepare_timesteps(pipe, inputs.height, inputs.width, inputs.steps)
    guidance = guidance_tensor(pipe, inputs.guidance_scale)
    image_ids = latent_image_ids(pipe, inputs.height, inputs.width, embedding.prompt_embeds.dtype)
    masked_ids = image_ids.index_select(0, masked)
    masked_conditioning = inputs.conditioning.index_select(1, masked)

    cursor = StepCursor()
    variant = activations.metadata.variant
    unmasked_rotary = transformer.pos_embed(image_ids.index_select(0, unmasked)) if variant == "hidden" else None
    unmasked_tokens = UnmaskedTokens(indices=unmasked, rotary=unmasked_rotary)
    blocks = blocks_in_order(transformer)
    processors: list[object] = [
        block.attn.processor
        if index < full_prefix_blocks
        else CachedFluxAttnProcessor(index, cursor, source, variant, unmasked_tokens)
        for index, block in enumerate(blocks)
    ]

    hooks = []
    if full_prefix_blocks > 0:
        masked_rotary = transformer.pos_embed(torch.cat((embedding.text_ids, masked_ids), dim=0))
        hooks = _install_token_gather(blocks, full_prefix_blocks, masked, masked_rotary)
    if transformer.single_transformer_blocks and isinstance(processors[-1], CachedFluxAttnProcessor):
        # Registered after the gather hooks, so it receives the rotary table they set.
        hooks.append(text_keys_only(transformer.single_transformer_blocks[-1], processors[-1]))

    latents = trajectory[0].index_select(0, masked).unsqueeze(0)
    ids = masked_ids if full_prefix_blocks == 0 else image_ids
    original = swap_attention_processors(transformer, processors)
    try:
        # The tables are built before packing starts: their projections run once per request.
        with step_tables(transformer, cursor, timesteps, guidance, embedding, ids), packed_linears(transformer):
            for index, t in enumerate(timesteps):
                cursor.step = index
                if full_prefix_blocks == 0:
                    hidden_states = torch.cat((latents, masked_conditioning), dim=2)
                else:
                    # Prefix blocks need every token: unmasked latents follow the cached template trajectory.
                    all_latents = trajectory[index].clone().unsqueeze(0)
                    all_latents[:, masked] = latents
                    hidden_states = torch.cat((all_latents, inputs.conditioning), dim=2)
                noise_pred = predict_noise(transformer, hidden_states, t, guidance, embedding, ids)
                latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(index + 1, inputs.steps)
    finally:
        for hook in hooks:
            hook.remove()
        swap_attention_processors(transformer, original)

    final = trajectory[-1].clone()
    final[masked] = latents[0]
    return final


def predict_noise(
    transformer: torch.nn.Module,
    hidden_states: torch.Tensor,
    t: torch.Tensor,
    guidance: torch.Tensor | None,
    embedding: PromptEmbedding,
    image_ids: torch.Tensor,
) -> torch.Tensor:
    """Run one transformer forward pass as FluxFillPipeline does and return its noise prediction."""
    return transformer(
        hidden_states=hidden_states,
        timestep=t.expand(1).to(hidden_states.dtype) / 1000,
        guidance=guidance,
        pooled_projections=embedding.pooled_prompt_embeds,
        encoder_hidden_states=embedding.prompt_embeds,
        txt_ids=embedding.text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]


def _install_token_gather(
    blocks: list[torch.nn.Module], first_masked_block: int, masked: torch.Tensor, masked_rotary: RotaryEmbedding
) -> list[torch.utils.hooks.RemovableHandle]:
    """Make block `first_masked_block` keep only masked image tokens, and later blocks use their rotary table."""

    def gather(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        kwargs["hidden_states"] = kwargs["hidden_states"].index_select(1, masked)
        kwargs["image_rotary_emb"] = masked_rotary
        return args, kwargs

    def use_masked_rotary(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        kwargs["image_rotary_emb"] = masked_rotary
        return args, kwargs

    hooks = [blocks[first_masked_block].register_forward_pre_hook(gather, with_kwargs=True)]
    for block in blocks[first_masked_block + 1 :]:
        hooks.append(block.register_forward_pre_hook(use_masked_rotary, with_kwargs=True))
    return hooks
