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
