"""Packing of several requests' tokens into one batch without padding: one token per batch row.

Joint token order is the text tokens of all requests (in request order), then their masked image tokens. Single
blocks see this order directly, and double blocks see the text and image parts as their two streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.state import RequestState
from workers.masked.processors import RotaryEmbedding


@dataclass(frozen=True)
class RequestSpan:
    """Positions of one request's tokens in the packed text, image and joint streams."""

    text_start: int
    text_end: int
    image_start: int
    image_end: int
    joint_rows: torch.Tensor


@dataclass(frozen=True)
class BatchLayout:
    """Tensors that depend only on which requests are in the batch, so they are reused while it is unchanged."""

    states: tuple[RequestState, ...]
    spans: tuple[RequestSpan, ...]
    num_text: int
    num_image: int
    text_request_index: torch.Tensor
    image_request_index: torch.Tensor
    joint_request_index: torch.Tensor
    text_first_rows: torch.Tensor
    image_first_rows: torch.Tensor
    rotary: RotaryEmbedding
    prompt_embeds: torch.Tensor
    pooled_projections: torch.Tensor
    guidance: torch.Tensor | None
    conditioning: torch.Tensor

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(state.handle.request_id for state in self.states)


@dataclass(frozen=True)
class PackedStep:
    """Inputs of one transformer pass: the batch layout plus this step's latents and timesteps."""

    layout: BatchLayout
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    steps: tuple[int, ...]


def build_layout(states: list[RequestState]) -> BatchLayout:
    """Lay out the requests' tokens in request order and gather their fixed per-request tensors."""
    spans = []
    text_start = 0
    image_start = 0
    num_text = sum(state.num_text for state in states)
    for state in states:
        text_end = text_start + state.num_text
        image_end = image_start + state.num_masked
        rows = torch.cat(
            (torch.arange(text_start, text_end), torch.arange(num_text + image_start, num_text + image_end))
        )
        spans.append(RequestSpan(text_start, text_end, image_start, image_end, rows.to(state.latents.device)))
        text_start, image_start = text_end, image_end

    device = states[0].latents.device
    counts_text = torch.tensor([state.num_text for state in states], device=device)
    counts_image = torch.tensor([state.num_masked for state in states], device=device)
    request_index = torch.arange(len(states), device=device)
    text_request_index = request_index.repeat_interleave(counts_text)
    image_request_index = request_index.repeat_interleave(counts_image)
    rotary_parts = [state.text_rotary for state in states] + [state.image_rotary for state in states]
    embeddings = [state.request.inputs.embedding for state in states]
    guidance = None if states[0].guidance is None else torch.cat([state.guidance for state in states])
    return BatchLayout(
        states=tuple(states),
        spans=tuple(spans),
        num_text=num_text,
        num_image=image_start,
        text_request_index=text_request_index,
        image_request_index=image_request_index,
        joint_request_index=torch.cat((text_request_index, image_request_index)),
        text_first_rows=torch.tensor([span.text_start for span in spans], device=device),
        image_first_rows=torch.tensor([span.image_start for span in spans], device=device),
        rotary=(torch.cat([cos for cos, _ in rotary_parts]), torch.cat([sin for _, sin in rotary_parts])),
        prompt_embeds=torch.cat([embedding.prompt_embeds[0] for embedding in embeddings]).unsqueeze(1),
        pooled_projections=torch.cat([embedding.pooled_prompt_embeds for embedding in embeddings]),
        guidance=guidance,
        conditioning=torch.cat([state.masked_conditioning[0] for state in states]).unsqueeze(1),
    )


def pack_step(layout: BatchLayout) -> PackedStep:
    """Stack the current latents (N_img, 1, 64) next to the conditioning and gather each request's timestep."""
    latents = torch.cat([state.latents[0] for state in layout.states]).unsqueeze(1)
    hidden_states = torch.cat((latents, layout.conditioning), dim=2)
    timestep = torch.stack([state.timesteps[state.step] for state in layout.states]).to(hidden_states.dtype) / 1000
    return PackedStep(
        layout=layout,
        hidden_states=hidden_states,
        timestep=timestep,
        steps=tuple(state.step for state in layout.states),
    )


def unpack_noise(layout: BatchLayout, noise: torch.Tensor) -> list[torch.Tensor]:
    """Split the packed prediction (N_img, 1, 64) into per-request (1, N_masked, 64) tensors."""
    flat = noise[:, 0]
    return [flat[span.image_start : span.image_end].unsqueeze(0) for span in layout.spans]
