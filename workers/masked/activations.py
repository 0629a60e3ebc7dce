"""Per-template activation cache: the data recorded by the warm-up run and read by masked inference."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

Variant = Literal["kv", "hidden"]
VARIANTS: tuple[Variant, ...] = ("kv", "hidden")

_BLOCK_TENSOR_NAME = re.compile(r"^s(\d{3})\.b(\d{2,3})\.(k|v|hidden)$")
_LATENTS_NAME = "latents"


@dataclass(frozen=True)
class BlockActivations:
    """Cached tensors of all image tokens for one denoising step and one transformer block.

    Variant "kv" fills `k` and `v`, shape (heads, N_img, head_dim), taken after norm_k and rotary embedding.
    Variant "hidden" fills `hidden`, shape (N_img, D): the normalized hidden states entering the attention layer.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.k, self.v, self.hidden) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class BlockCacheSource(Protocol):
    """Supplier of cached block activations. The cache layer may load them from host memory or disk."""

    def get(self, step: int, block: int) -> BlockActivations: ...


@dataclass(frozen=True)
class ActivationsMetadata:
    """Settings of the warm-up run. A masked request must use the same ones to reuse the cache."""

    variant: Variant
    num_steps: int
    num_blocks: int
    num_double_blocks: int
    grid: tuple[int, int]
    dtype: torch.dtype
    seed: int
    guidance_scale: float
    height: int
    width: int
    max_sequence_length: int
    warmup_prompt: str

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_strings(self) -> dict[str, str]:
        """Return the metadata as str -> str pairs, the form safetensors stores in its header."""
        return {
            "variant": self.variant,
            "num_steps": str(self.num_steps),
            "num_blocks": str(self.num_blocks),
            "num_double_blocks": str(self.num_double_blocks),
            "grid": f"{self.grid[0]}x{self.grid[1]}",
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": str(self.seed),
            "guidance_scale": repr(self.guidance_scale),
            "height": str(self.height),
            "width": str(self.width),
            "max_sequence_length": str(self.max_sequence_length),
            "warmup_prompt": self.warmup_prompt,
        }

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> ActivationsMetadata:
        variant = values["variant"]
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant {variant!r} in activation metadata; expected one of {VARIANTS}.")
        grid_h, grid_w = (int(part) for part in values["grid"].split("x"))
        dtype = getattr(torch, values["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Invalid dtype {values['dtype']!r} in activation metadata; expected a torch dtype name.")
        return cls(
            variant=variant,  # type: ignore[arg-type]
            num_steps=int(values["num_steps"]),
            num_blocks=int(values["num_blocks"]),
            num_double_blocks=int(values["num_double_blocks"]),
            grid=(grid_h, grid_w),
            dtype=dtype,
            seed=int(values["seed"]),
            guidance_scale=float(values["guidance_scale"]),
            height=int(values["height"]),
            width=int(values["width"]),
            max_sequence_length=int(values["max_sequence_length"]),
            warmup_prompt=values["warmup_prompt"],
        )


@dataclass
class TemplateActivations:
    """Activations of one full warm-up run on a template.

    `latents` has shape (num_steps + 1, N_img, 64): the packed latents before each step, then the final latents.
    `blocks[step][block]` contains the cached tensors; double-stream blocks come first, then single-stream blocks.
    """

    metadata: ActivationsMetadata
    latents: torch.Tensor
    blocks: list[list[BlockActivations]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        block_bytes = sum(entry.nbytes for step in self.blocks for entry in step)
        return block_bytes + self.latents.numel() * self.latents.element_size()

    def get(self, step: int, block: int) -> BlockActivations:
        return self.blocks[step][block]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flatten into names such as `s003.b05.k` and `latents`, ready for `safetensors.torch.save_file`."""
        tensors: dict[str, torch.Tensor] = {_LATENTS_NAME: self.latents.contiguous()}
        for step, step_blocks in enumerate(self.blocks):
            for block, entry in enumerate(step_blocks):
                for name in ("k", "v", "hidden"):
                    tensor = getattr(entry, name)
                    if tensor is not None:
                        tensors[block_tensor_name(step, block, name)] = tensor.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: ActivationsMetadata) -> TemplateActivations:
        """Rebuild from `to_tensors()` output. Raises ValueError when a tensor of some step or block is missing."""
        if _LATENTS_NAME not in tensors:
            raise ValueError("Missing tensor 'latents' in cached activations; store the output of to_tensors().")
        parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            match = _BLOCK_TENSOR_NAME.match(name)
            if match is None:
                continue
            key = (int(match.group(1)), int(match.group(2)))
            parts.setdefault(key, {})[match.group(3)] = tensor

        required = ("k", "v") if metadata.variant == "kv" else ("hidden",)
        blocks: list[list[BlockActivations]] = []
        for step in range(metadata.num_steps):
            step_blocks = []
            for block in range(metadata.num_blocks):
                found = parts.get((step, block), {})
                missing = [block_tensor_name(step, block, name) for name in required if name not in found]
                if missing:
                    raise ValueError(
                        f"Missing cached tensors {missing} for step {step}, block {block} "
                        f"(expected {metadata.num_steps} steps x {metadata.num_blocks} blocks, variant {metadata.variant})."
                    )
                step_blocks.append(BlockActivations(**found))
            blocks.append(step_blocks)
        return cls(metadata=metadata, latents=tensors[_LATENTS_NAME], blocks=blocks)


def block_tensor_name(step: int, block: int, name: str) -> str:
    return f"s{step:03d}.b{block:02d}.{name}"


class InMemoryBlockCacheSource:
    """BlockCacheSource over activations already in memory."""

    def __init__(self, activations: TemplateActivations) -> None:
        self._activations = activations

    def get(self, step: int, block: int) -> BlockActivations:
        return self._activations.blocks[step][block]
