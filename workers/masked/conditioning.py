"""Inputs of a Flux Fill denoising run, built with the stock FluxFillPipeline helpers.

Reusing the pipeline's own helpers (prompt encoding, timestep shift, mask packing, VAE encoding) keeps the masked
path bit-compatible with `FluxFillPipeline.__call__` for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


@dataclass(frozen=True)
class PromptEmbedding:
    """Text conditioning: prompt_embeds (1, T, joint_dim), pooled (1, pooled_dim), text_ids (T, 3)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_embeds.shape[1])


def encode_prompt(pipe: FluxFillPipeline, prompt: str, max_sequence_length: int) -> PromptEmbedding:
    # `FluxFillPipeline.__call__` runs under no_grad, but `encode_prompt` alone records autograd history.
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length
        )
    return PromptEmbedding(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, text_ids=text_ids)


def embedding_from_tensors(
    pipe: FluxFillPipeline, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor
) -> PromptEmbedding:
    """Wrap precomputed text embeddings, adding text_ids as `pipe.encode_prompt` does."""
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=None,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        device=pipe._execution_device,
    )
    return PromptEmbedding(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, text_ids=text_ids)


def token_grid(pipe: FluxFillPipeline, height: int, width: int) -> tuple[int, int]:
    """Return the packed token grid: each token covers (2 * vae_scale_factor) pixels squared."""
    patch = 2 * pipe.vae_scale_factor
    if height % patch or width % patch:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the {patch}-pixel token size. "
            f"Pad it to a multiple of {patch} first."
        )
    return height // patch, width // patch


def prepare_timesteps(pipe: FluxFillPipeline, height: int, width: int, steps: int) -> torch.Tensor:
    """Set the scheduler up exactly as `FluxFillPipeline.__call__` does with strength 1.0; return its timesteps."""
    device = pipe._execution_device
    sigmas = np.linspace(1.0, 1 / steps, steps)
    image_seq_len = (int(height) // pipe.vae_scale_factor // 2) * (int(width) // pipe.vae_scale_factor // 2)
    config = pipe.scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    timesteps, _ = pipe.get_timesteps(steps, 1.0, device)
    return timesteps


def guidance_tensor(pipe: FluxFillPipeline, guidance_scale: float) -> torch.Tensor | None:
    if not pipe.transformer.config.guidance_embeds:
        return None
    return torch.full([1], guidance_scale, device=pipe._execution_device, dtype=torch.float32)


def latent_image_ids(pipe: FluxFillPipeline, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    grid_h, grid_w = token_grid(pipe, height, width)
    return pipe._prepare_latent_image_ids(1, grid_h, grid_w, pipe._execution_device, dtype)


def skip_initial_draws(
    pipe: FluxFillPipeline, generator: torch.Generator, height: int, width: int, dtype: torch.dtype
) -> None:
    """Advance `generator` past the two draws `__call__` makes before encoding the masked image.

    With strength 1.0 the stock pipeline VAE-encodes the whole input image (sampling one latent-shaped normal
    draw) and then draws the initial noise, which equals the template's cached initial latents. Drawing the same
    shapes here skips that encode while keeping the masked-image encode on the same random stream.
    NOTE: this mirrors `FluxFillPipeline.__call__` of diffusers 0.42 with strength 1.0. The exactness tests fail
    if a diffusers update changes the order or shapes of those draws.
    """
    grid_h, grid_w = token_grid(pipe, height, width)
    shape = (1, pipe.vae.config.latent_channels, 2 * grid_h, 2 * grid_w)
    randn_tensor(shape, generator=generator, device=pipe.vae.device, dtype=pipe.vae.dtype)
    randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=dtype)


def prepare_fill_conditioning(
    pipe: FluxFillPipeline,
    image: Image.Image,
    mask: Image.Image,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Return the Flux Fill conditioning (1, N_img, 320): masked-image latents (64) then mask channels (256).

    `generator` must be in the state `__call__` has right before `prepare_mask_latents`.
    """
    width, height = image.size
    device = pipe._execution_device
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    mask_image = pipe.mask_processor.preprocess(mask, height=height, width=width)
    masked_image = (init_image * (1 - mask_image)).to(device=device, dtype=dtype)
    mask_latents, masked_image_latents = pipe.prepare_mask_latents(
        mask_image,
        masked_image,
        1,
        pipe.vae.config.latent_channels,
        1,
        height,
        width,
        dtype,
        device,
        generator,
    )
    return torch.cat((masked_image_latents, mask_latents), dim=-1)
