"""Storage codecs for cached activations: fp32, fp16, bf16, int8 and fp8 (e4m3).

int8 and fp8 are symmetric with one fp32 scale per token, taken as the absolute maximum over the
last dimension (the channel dimension of K/V and hidden states, shape [..., tokens, channels]).
Per-token scales keep a token with large activations from crushing the precision of the others.
`fp16` stores 2 bytes per value: float16, except for bf16 tensors and tensors with values beyond
the float16 range, which it stores as bfloat16. The default codec is chosen from the measurements
in docs/cache.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Codec = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8")
DEFAULT_CODEC: Codec = "fp16"

# Suffix of the per-token scale tensor stored next to an int8/fp8 tensor.
SCALE_SUFFIX = "#scale"

_FLOAT_CODECS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite value of float8_e4m3fn
_FP16_MAX = 65504.0  # largest finite value of float16


def fp8_supported() -> bool:
    """Return True when this torch build can cast to float8_e4m3fn on CPU."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        torch.zeros(1).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError):
        return False
    return True


def check_codec(codec: str) -> Codec:
    """Validate a codec name from settings and return it."""
    if codec not in CODECS:
        raise ValueError(f"cache codec {codec!r} is not supported; use one of {CODECS}.")
    if codec == "fp8" and not fp8_supported():
        raise ValueError("cache codec 'fp8' needs torch.float8_e4m3fn, which this torch build lacks; use 'int8'.")
    return codec  # type: ignore[return-value]


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def encoded_nbytes(shape: torch.Size | tuple[int, ...], codec: Codec) -> int:
    """Return the bytes one tensor of `shape` takes under `codec`, scales included."""
    numel = 1
    for dim in shape:
        numel *= dim
    if codec in _FLOAT_CODECS:
        return numel * _FLOAT_CODECS[codec].itemsize
    tokens = numel // shape[-1] if len(shape) > 0 and shape[-1] > 0 else 0
    return numel + tokens * 4  # 1-byte values + one fp32 scale per token


def encoded_nbytes_of(tensors: Mapping[str, torch.Tensor], codec: Codec) -> int:
    """Return the bytes `encode(tensors, codec)` will take, without materializing it."""
    return sum(encoded_nbytes(tensor.shape, codec) for tensor in tensors.values())


def encode(tensors: Mapping[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """Encode every tensor with `codec`; int8/fp8 add a `<name>#scale` tensor of shape [..., 1]."""
    encoded: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_scale_name(name):
            raise ValueError(f"tensor name {name!r} ends with {SCALE_SUFFIX!r}, which is reserved; rename it.")
        encoded.update(_encode_one(name, tensor, codec))
    return encoded


def _encode_one(name: str, tensor: torch.Tensor, codec: Codec) -> dict[str, torch.Tensor]:
    if codec == "fp16" and _needs_bfloat16(tensor):
        # Same 2 bytes per value: bf16 sources stay lossless, and values beyond the float16 range
        # would otherwise become inf. Decoding casts whatever float type was stored.
        return {name: tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()}
    if codec in _FLOAT_CODECS:
        return {name: tensor.detach().to(device="cpu", dtype=_FLOAT_CODECS[codec]).contiguous()}
    if tensor.dim() == 0:
        raise ValueError(f"tensor {name!r} is a scalar; {codec} needs a channel dimension for its scales.")
    values = tensor.detach().to(device="cpu", dtype=torch.float32)
    limit = _INT8_MAX if codec == "int8" else _FP8_MAX
    # Shape [..., tokens, 1]; a zero row keeps scale 1 so decoding never divides by zero.
    scale = values.abs().amax(dim=-1, keepdim=True) / limit
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = values / scale
    if codec == "int8":
        quantized = scaled.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        quantized = scaled.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return {name: quantized.contiguous(), name + SCALE_SUFFIX: scale.contiguous()}


def _needs_bfloat16(tensor: torch.Tensor) -> bool:
    if tensor.dtype == torch.bfloat16:
        return True
    return tensor.numel() > 0 and bool(tensor.detach().abs().amax() > _FP16_MAX)


def decode_tensor(
    encoded: Mapping[str, torch.Tensor], name: str, codec: Codec, dtype: torch.dtype
) -> torch.Tensor:
    """Decode tensor `name` from an `encode` result to `dtype`, on the device the values are on."""
    values = encoded[name]
    if codec in _FLOAT_CODECS:
        return values.to(dtype)
    scale = encoded[name + SCALE_SUFFIX]
    return (values.to(torch.float32) * scale).to(dtype)


def decode(encoded: Mapping[str, torch.Tensor], codec: Codec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Decode every tensor of an `encode` result to `dtype`."""
    return {name: decode_tensor(encoded, name, codec, dtype) for name in encoded if not is_scale_name(name)}
