"""Per-request denoising state of an admitted request: its own scheduler, step, latents and cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import FluxFillPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

from workers.engine.request import EngineRequest, RequestHandle
from workers.masked.activations import BlockCacheSource, InMemoryBlockCacheSource, Variant
from workers.masked.conditioning import guidance_tensor, latent_image_ids, prepare_timesteps
from workers.masked.processors import RotaryEmbedding


@dataclass
class RequestState:
    """Everything the engine needs to run one more step of a request.

    Tensors that stay fixed over the run (rotary tables, conditioning, text embeddings) are built once at
    admission. `latents` (1, N_masked, 64) and `step` advance after each transformer pass.
    """

    handle: RequestHandle
    scheduler: FlowMatchEulerDiscreteScheduler
    timesteps: torch.Tensor
    guidance: torch.Tensor | None
    latents: torch.Tensor
    masked_conditioning: torch.Tensor
    text_rotary: RotaryEmbedding
    image_rotary: RotaryEmbedding
    source: BlockCacheSource
    variant: Variant
    unmasked: torch.Tensor
    unmasked_rotary: RotaryEmbedding | None
    step: int = 0

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    @property
    def num_text(self) -> int:
        return self.request.inputs.embedding.num_tokens

    @property
    def num_masked(self) -> int:
        return int(self.latents.shape[1])

    @property
    def steps_total(self) -> int:
        return int(self.timesteps.numel())

    @property
    def finished(self) -> bool:
        return self.step >= self.steps_total

    def final_latents(self) -> torch.Tensor:
        """Template's final latents with the masked tokens replaced, as `denoise_masked` returns them."""
        masked = self.request.inputs.layout.masked.to(self.latents.device)
        final = self.request.activations.latents[-1].clone()
        final[masked] = self.latents[0]
        return final


def admit_request(pipe: FluxFillPipeline, handle: RequestHandle) -> RequestState:
    """Build the request's state with a private copy of the pipeline's scheduler set up for its steps.

    `prepare_timesteps` configures `pipe.scheduler` as the stock pipeline does. The engine owns the pipeline,
    so the copy taken right after is the request's own scheduler, unaffected by later admissions.
    """
    request = handle.request
    inputs = request.inputs
    activations = request.activations
    transformer = pipe.transformer
    device = activations.latents.device
    masked = inputs.layout.masked.to(device)
    unmasked = inputs.layout.unmasked.to(device)

    timesteps = prepare_timesteps(pipe, inputs.height, inputs.width, inputs.steps)
    scheduler = copy.deepcopy(pipe.scheduler)
    image_ids = latent_image_ids(pipe, inputs.height, inputs.width, inputs.embedding.prompt_embeds.dtype)
    text_ids = inputs.embedding.text_ids
    # One rotary call for text and masked tokens, as the stock forward makes, then split per stream.
    cos, sin = transformer.pos_embed(torch.cat((text_ids, image_ids.index_select(0, masked))))
    num_text = text_ids.shape[0]
    variant = activations.metadata.variant
    return RequestState(
        handle=handle,
        scheduler=scheduler,
        timesteps=timesteps,
        guidance=guidance_tensor(pipe, inputs.guidance_scale),
        latents=activations.latents[0].index_select(0, masked).unsqueeze(0),
        masked_conditioning=inputs.conditioning.index_select(1, masked),
        text_rotary=(cos[:num_text], sin[:num_text]),
        image_rotary=(cos[num_text:], sin[num_text:]),
        source=request.block_source if request.block_source is not None else InMemoryBlockCacheSource(activations),
        variant=variant,
        unmasked=unmasked,
        unmasked_rotary=transformer.pos_embed(image_ids.index_select(0, unmasked)) if variant == "hidden" else None,
    )
