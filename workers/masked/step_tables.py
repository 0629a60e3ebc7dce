"""Per-request tables of the Flux transformer's step-level inputs, computed once for all denoising steps.

Every step of a stock forward pass recomputes values that depend only on the step's timestep and the request's
prompt: the time/guidance/text embedding `temb`, each block's AdaLayerNorm modulation (`linear(silu(temb))`,
a one-row projection onto 3 to 6 times the hidden size), the projected prompt tokens and the rotary table. With
one row per step these projections read every modulation weight once per step, which costs as much time as
the masked tokens' own projections when few tokens are masked. `step_tables` computes all steps' rows with one
projection per layer before the loop and, for the loop's duration, puts small modules in place of the stock
submodules that return the current step's row. The block code and the checkpoint stay stock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from workers.masked.conditioning import PromptEmbedding
from workers.masked.processors import RotaryEmbedding, StepCursor


class StepRows(torch.nn.Module):
    """Returns row `cursor.step` of a (steps, ...) table in place of a submodule whose output it precomputed."""

    def __init__(self, table: torch.Tensor, cursor: StepCursor) -> None:
        super().__init__()
        self.table = table
        self.cursor = cursor

    def forward(self, *_inputs: object) -> torch.Tensor:
        return self.table[self.cursor.step].unsqueeze(0)


class Constant(torch.nn.Module):
    """Returns one precomputed value in place of a submodule whose inputs do not change between steps."""

    def __init__(self, value: torch.Tensor | RotaryEmbedding) -> None:
        super().__init__()
        self.value = value

    def forward(self, *_inputs: object) -> torch.Tensor | RotaryEmbedding:
        return self.value


def _modulation_layers(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
    """AdaLayerNorm modules whose `linear` projects silu(temb), in the order the forward pass uses them."""
    layers: list[torch.nn.Module] = []
    for block in transformer.transformer_blocks:
        layers += [block.norm1, block.norm1_context]
    layers += [block.norm for block in transformer.single_transformer_blocks]
    layers.append(transformer.norm_out)
    return layers


@contextmanager
def step_tables(
    transformer: FluxTransformer2DModel,
    cursor: StepCursor,
    timesteps: torch.Tensor,
    guidance: torch.Tensor | None,
    embedding: PromptEmbedding,
    image_ids: torch.Tensor,
) -> Iterator[None]:
    """Precompute the step-level inputs of a loop over `timesteps` and serve them by `cursor.step`.

    Inside the context, transformer calls must pass the same prompt, guidance and `image_ids` and the timestep
    of step `cursor.step`; `predict_noise` does. Values equal the stock forward's up to float rounding of the
    batched projections.
    """
    dtype = embedding.prompt_embeds.dtype
    steps = timesteps.shape[0]
    # The same arithmetic as `predict_noise` and the stock forward apply to one step's timestep and guidance.
    scaled_timesteps = (timesteps.to(dtype) / 1000).to(dtype) * 1000
    pooled = embedding.pooled_prompt_embeds.expand(steps, -1)
    if guidance is None:
        temb = transformer.time_text_embed(scaled_timesteps, pooled)
    else:
        temb = transformer.time_text_embed(scaled_timesteps, guidance.to(dtype).expand(steps) * 1000, pooled)

    replaced: list[tuple[torch.nn.Module, str, torch.nn.Module]] = [
        (transformer, "time_text_embed", StepRows(temb, cursor)),
        (transformer, "context_embedder", Constant(transformer.context_embedder(embedding.prompt_embeds))),
        (transformer, "pos_embed", Constant(transformer.pos_embed(torch.cat((embedding.text_ids, image_ids), dim=0)))),
    ]
    for norm in _modulation_layers(transformer):
        replaced.append((norm, "linear", StepRows(norm.linear(norm.silu(temb)), cursor)))

    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replaced]
    try:
        for owner, name, module in replaced:
            setattr(owner, name, module)
        yield
    finally:
        for owner, name, module in originals:
            setattr(owner, name, module)
