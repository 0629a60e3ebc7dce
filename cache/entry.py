"""The unit the cache stores: the encoded tensors of one warm-up and their metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from cache.compression import Codec, check_codec, decode_tensor, is_scale_name


@dataclass(frozen=True)
class EntryMeta:
    """Metadata of one cached warm-up.

    `source_dtype` is the dtype the engine produced and gets back on decode (a torch dtype name
    such as "bfloat16"); `extra` carries engine-specific strings (e.g. token layout) unchanged.
    """

    steps: int
    blocks: int
    codec: Codec
    source_dtype: str
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.blocks <= 0:
            raise ValueError(f"EntryMeta steps={self.steps} blocks={self.blocks} are invalid; both must be > 0.")
        check_codec(self.codec)
        if not isinstance(getattr(torch, self.source_dtype, None), torch.dtype):
            raise ValueError(f"EntryMeta.source_dtype={self.source_dtype!r} is not a torch dtype name.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.source_dtype)

    def to_strings(self) -> dict[str, str]:
        """Encode as the string map that safetensors metadata accepts."""
        return {
            "steps": str(self.steps),
            "blocks": str(self.blocks),
            "codec": self.codec,
            "source_dtype": self.source_dtype,
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }

    @classmethod
    def from_strings(cls, values: Mapping[str, str]) -> EntryMeta:
        return cls(
            steps=int(values["steps"]),
            blocks=int(values["blocks"]),
            codec=values["codec"],  # type: ignore[arg-type]
            source_dtype=values["source_dtype"],
            extra=json.loads(values.get("extra", "{}")),
        )


def block_prefix(step: int, block: int) -> str:
    """Return the name prefix of one step/block, e.g. "s003.b05." (names look like "s003.b05.k")."""
    return f"s{step:03d}.b{block:02d}."


@dataclass(frozen=True)
class CacheEntry:
    """Encoded tensors of one warm-up (see `cache.compression.encode`) plus metadata.

    Tensors are CPU, contiguous and treated as read-only: several readers may share one entry.
    """

    tensors: Mapping[str, torch.Tensor]
    meta: EntryMeta

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    def names(self) -> Iterator[str]:
        """Yield the logical tensor names, without the scale tensors."""
        return (name for name in self.tensors if not is_scale_name(name))

    def block_names(self, step: int, block: int) -> list[str]:
        prefix = block_prefix(step, block)
        return [name for name in self.names() if name.startswith(prefix)]

    def decode(self, name: str) -> torch.Tensor:
        """Decode one tensor back to the engine's dtype."""
        return decode_tensor(self.tensors, name, self.meta.codec, self.meta.torch_dtype)
