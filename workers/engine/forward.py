"""One transformer pass over a packed batch, driving the stock FluxTransformer2DModel submodules.

Every token is its own batch row, so linear layers and layer norms see the packed tokens exactly as they
would see a (1, N, D) sequence. A per-token `temb` (N, D) gives each token its own request's AdaLayerNorm
modulation. Double blocks get the image temb as their `temb` argument, and a forward pre-hook
hands `norm1_context` the text tokens' temb instead. Single blocks get all tokens (text first) as
`hidden_states` and an empty (N, 0, D) `encoder_hidden_states`, which their concatenation on dim 1 leaves
unchanged. Checked against FluxTransformerBlock and FluxSingleTransformerBlock of diffusers 0.42.1.
The modulation projections run once per request (see `workers.engine.modulation`). On CPU in float32 the
other linear layers run on weights packed once per process (see `workers.masked.weight_packing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from workers.engine.attention import PackedFluxAttnProcessor
from workers.engine.modulation import shared_modulation
from workers.engine.packing import PackedStep
from workers.masked.transformer_blocks import blocks_in_order, swap_attention_processors
from workers.masked.weight_packing import packed_linears


@contextmanager
def _packed_processors(transformer: FluxTransformer2DModel, packed: PackedStep) -> Iterator[None]:
    blocks = blocks_in_order(transformer)
    processors = [PackedFluxAttnProcessor(index, packed) for index in range(len(blocks))]
    original = swap_attention_processors(transformer, processors)
    try:
        yield
    finally:
        swap_attention_processors(transformer, original)


@contextmanager
def _text_temb(transformer: FluxTransformer2DModel, text_temb: torch.Tensor) -> Iterator[None]:
    """Make every double block's `norm1_context` modulate the text tokens with their own temb rows."""

    def use_text_temb(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        kwargs["emb"] = text_temb
        return args, kwargs

    hooks = [
        block.norm1_context.register_forward_pre_hook(use_text_temb, with_kwargs=True)
        for block in transformer.transformer_blocks
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def packed_forward(transformer: FluxTransformer2DModel, packed: PackedStep) -> torch.Tensor:
    """Return the noise prediction (N_img, 1, out_channels) of all packed requests' masked tokens."""
    layout = packed.layout
    hidden_states = transformer.x_embedder(packed.hidden_states)
    timestep = packed.timestep.to(hidden_states.dtype) * 1000
    if layout.guidance is None:
        temb = transformer.time_text_embed(timestep, layout.pooled_projections)
    else:
        guidance = layout.guidance.to(hidden_states.dtype) * 1000
        temb = transformer.time_text_embed(timestep, guidance, layout.pooled_projections)
    text_temb = temb.index_select(0, layout.text_request_index)
    image_temb = temb.index_select(0, layout.image_request_index)
    text_states = transformer.context_embedder(layout.prompt_embeds)

    with (
        _packed_processors(transformer, packed),
        _text_temb(transformer, text_temb),
        shared_modulation(transformer, layout),
        packed_linears(transformer),
    ):
        for block in transformer.transformer_blocks:
            text_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=text_states,
                temb=image_temb,
                image_rotary_emb=layout.rotary,
            )
        joint_states = torch.cat((text_states, hidden_states))
        joint_temb = torch.cat((text_temb, image_temb))
        no_text = joint_states[:, :0]
        for block in transformer.single_transformer_blocks:
            _, joint_states = block(
                hidden_states=joint_states,
                encoder_hidden_states=no_text,
                temb=joint_temb,
                image_rotary_emb=layout.rotary,
            )
        hidden_states = transformer.norm_out(joint_states[layout.num_text :], image_temb)
    return transformer.proj_out(hidden_states)
