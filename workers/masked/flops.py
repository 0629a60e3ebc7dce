"""Analytic FLOP counts of one FluxTransformer2DModel forward pass, full or restricted to masked tokens.

One multiply-add counts as 2 FLOPs. Counted: every linear layer applied per token (embedders, Q/K/V and output
projections, MLPs, final projection), the per-step AdaLN modulation layers, and attention (QK^T and AV).
Not counted: norms, activations, rotary embedding and softmax, which are linear in the token count and small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.masked.activations import Variant


@dataclass(frozen=True)
class TransformerShape:
    """Sizes of a FluxTransformer2DModel that its FLOP count depends on."""

    hidden: int
    mlp_hidden: int
    double_blocks: int
    single_blocks: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int

    @property
    def num_blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @classmethod
    def from_config(cls, config: Any) -> TransformerShape:
        """Read the shape from `FluxTransformer2DModel.config` (MLP ratio 4, as in diffusers 0.42)."""
        hidden = config.num_attention_heads * config.attention_head_dim
        out_channels = config.out_channels or config.in_channels
        return cls(
            hidden=hidden,
            mlp_hidden=4 * hidden,
            double_blocks=config.num_layers,
            single_blocks=config.num_single_layers,
            in_channels=config.in_channels,
            out_channels=out_channels * config.patch_size**2,
            joint_attention_dim=config.joint_attention_dim,
        )


def _double_block_flops(shape: TransformerShape, text: int, queries: int, keys: int) -> float:
    d, f = shape.hidden, shape.mlp_hidden
    tokens = text + queries
    projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * d
    mlp = 2 * 2 * tokens * d * f
    attention = 2 * 2 * tokens * keys * d
    modulation = 2 * 2 * d * (6 * d)
    return projections + mlp + attention + modulation


def _single_block_flops(shape: TransformerShape, text: int, queries: int, keys: int, text_keys_only: bool = False) -> float:
    """FLOPs of a single-stream block; with `text_keys_only` the text tokens get K and V projections only."""
    d, f = shape.hidden, shape.mlp_hidden
    tokens = queries if text_keys_only else text + queries
    projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * f + 2 * tokens * (d + f) * d
    if text_keys_only:
        projections += 2 * text * d * (2 * d)
    attention = 2 * 2 * tokens * keys * d
    modulation = 2 * d * (3 * d)
    return projections + attention + modulation


def transformer_flops(
    shape: TransformerShape,
    text_tokens: int,
    image_tokens: int,
    masked_tokens: int | None = None,
    variant: Variant = "kv",
    full_prefix_blocks: int = 0,
) -> float:
    """Return the FLOPs of one transformer forward pass.

    `masked_tokens=None` counts the stock computation on all `image_tokens`. Otherwise the first
    `full_prefix_blocks` blocks run on all tokens and the rest on `masked_tokens` image queries, which attend to
    all text and image keys, and a masked last block computes only the K and V of the text tokens, whose
    outputs the model drops (`workers.masked.text_keys`). Variant "hidden" adds the K and V projections of
    the cached unmasked tokens.
    """
    all_blocks_full = masked_tokens is None or full_prefix_blocks >= shape.num_blocks
    queries_after_prefix = image_tokens if all_blocks_full else masked_tokens
    keys = text_tokens + image_tokens
    d = shape.hidden
    total = 2 * text_tokens * shape.joint_attention_dim * d + 2 * 2 * d * (2 * d)

    for block in range(shape.num_blocks):
        queries = image_tokens if block < full_prefix_blocks else queries_after_prefix
        if block < shape.double_blocks:
            total += _double_block_flops(shape, text_tokens, queries, keys)
        else:
            keys_only = not all_blocks_full and block == shape.num_blocks - 1 and block >= full_prefix_blocks
            total += _single_block_flops(shape, text_tokens, queries, keys, text_keys_only=keys_only)
        if variant == "hidden" and queries < image_tokens:
            total += 2 * (image_tokens - queries) * d * (2 * d)

    first_queries = image_tokens if full_prefix_blocks > 0 else queries_after_prefix
    total += 2 * first_queries * shape.in_channels * d
    total += 2 * queries_after_prefix * d * shape.out_channels
    return float(total)


def flop_speedup_limit(
    shape: TransformerShape,
    text_tokens: int,
    image_tokens: int,
    masked_tokens: int,
    variant: Variant = "kv",
    full_prefix_blocks: int = 0,
) -> float:
    """Return transformer FLOPs of the stock pass divided by those of the masked pass."""
    full = transformer_flops(shape, text_tokens, image_tokens)
    masked = transformer_flops(shape, text_tokens, image_tokens, masked_tokens, variant, full_prefix_blocks)
    return full / masked
