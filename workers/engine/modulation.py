"""One AdaLayerNorm modulation projection per request instead of per token.

Packed tokens carry per-token `temb` rows, so the stock AdaLayerNorm modules would run their modulation
`linear` (D -> 2D..6D) once per token, about half the work of a double block. All rows of one request are
equal, so hooks on each modulation `linear` feed it one row per request and repeat its output per token,
leaving the stock modules' code and results unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from workers.engine.packing import BatchLayout


def _share_rows(linear: torch.nn.Module, first_rows: torch.Tensor, request_index: torch.Tensor) -> list[Any]:
    """Make `linear` project only `first_rows` of its input and expand the result with `request_index`."""

    def select_requests(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].index_select(0, first_rows), *args[1:])

    def expand_tokens(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.index_select(0, request_index)

    return [linear.register_forward_pre_hook(select_requests), linear.register_forward_hook(expand_tokens)]


@contextmanager
def shared_modulation(transformer: FluxTransformer2DModel, layout: BatchLayout) -> Iterator[None]:
    """Install the hooks on every modulation layer for one packed pass and remove them afterwards."""
    image = (layout.image_first_rows, layout.image_request_index)
    text = (layout.text_first_rows, layout.text_request_index)
    joint = (layout.text_first_rows, layout.joint_request_index)
    hooks = _share_rows(transformer.norm_out.linear, *image)
    for block in transformer.transformer_blocks:
        hooks += _share_rows(block.norm1.linear, *image)
        hooks += _share_rows(block.norm1_context.linear, *text)
    for block in transformer.single_transformer_blocks:
        hooks += _share_rows(block.norm.linear, *joint)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
