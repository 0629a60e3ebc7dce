"""Global block numbering of FluxTransformer2DModel: double-stream blocks first, then single-stream blocks."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel


def processor_names(transformer: FluxTransformer2DModel) -> list[str]:
    """Return attention processor names in global block order, the keys `set_attn_processor` accepts."""
    double = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
    single = [f"single_transformer_blocks.{i}.attn.processor" for i in range(len(transformer.single_transformer_blocks))]
    return double + single


def blocks_in_order(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def swap_attention_processors(transformer: FluxTransformer2DModel, processors: list[object]) -> list[object]:
    """Install `processors` in global block order and return the ones they replace.

    Sets each block's `attn` processor directly, which avoids the module-tree walks of
    `attn_processors` and `set_attn_processor` on every request.
    """
    blocks = blocks_in_order(transformer)
    if len(processors) != len(blocks):
        raise ValueError(f"Expected {len(blocks)} attention processors (one per block), got {len(processors)}.")
    previous = [block.attn.processor for block in blocks]
    for block, processor in zip(blocks, processors):
        block.attn.set_processor(processor)
    return previous
