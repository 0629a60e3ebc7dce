"""Deterministic keys and K/V-like activations for tests and benchmarks."""

from __future__ import annotations

import dataclasses

import torch

from cache.entry import block_prefix
from cache.keys import CacheKey

_BASE_KEY = CacheKey(
    template_hash="t" * 64,
    model_id="black-forest-labs/FLUX.1-Fill-dev",
    model_revision="main",
    width=1024,
    height=1024,
    steps=28,
    scheduler_hash="s" * 64,
    seed=0,
    guidance=30.0,
    dtype="bfloat16",
    variant="kv",
    prompt_hash="p" * 64,
)


def make_key(index: int = 0, **overrides: object) -> CacheKey:
    """Return a valid key; `index` varies the template hash so distinct indexes never collide."""
    return dataclasses.replace(_BASE_KEY, template_hash=f"{index:064x}", **overrides)  # type: ignore[arg-type]


def make_activations(
    steps: int, blocks: int, tokens: int, channels: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Return K and V per step and block, each [tokens, channels], shaped like attention activations.

    Values are Gaussian with a few high-magnitude channels and a per-token magnitude spread, so a
    single scale per tensor would waste precision on most tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    outlier_channels = torch.randperm(channels, generator=generator)[: max(1, channels // 64)]
    tensors: dict[str, torch.Tensor] = {}
    for step in range(steps):
        for block in range(blocks):
            for name in ("k", "v"):
                values = torch.randn(tokens, channels, generator=generator)
                values[:, outlier_channels] *= 8.0
                values *= torch.rand(tokens, 1, generator=generator) * 2.0 + 0.25
                tensors[block_prefix(step, block) + name] = values.to(dtype)
    return tensors
