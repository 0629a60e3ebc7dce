"""Linear weights packed once per masked request for MKL's GEMM on CPU.

A plain float32 `F.linear` on CPU repacks the weight matrix into the GEMM kernel's layout on every call.
With thousands of rows that copy is small next to the arithmetic. A masked pass, though, multiplies a few
hundred rows (text and masked tokens) by each weight, once per step, so the copy becomes a large part of
each call. On a 2-core x86 machine, projections of 113 rows ran at 80-85% of the rate of 1152 rows.
`packed_linears` packs each weight for the row count it is called with, on its first call, and
reuses the packed copy on the later steps of the same request (`torch.ops.mkl._mkl_linear`, the kernel
PyTorch's compiler uses for frozen CPU models). The packed copies live only for the request, and the stock
`nn.Linear` modules are back in place afterwards.

Packing applies on CPU, in float32, where PyTorch has MKL, and when the model's linear weights fit
`EDITOR_PACK_WEIGHTS_MAX_MB`, because each packed copy takes about as much memory as its weight.
`EDITOR_PACK_WEIGHTS=0` turns it off. Results equal plain `F.linear` up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Projections with fewer rows are left plain: a packed copy costs as much as one call, and such small
# calls (per-step embeddings) are few.
MIN_PACKED_ROWS = 16
DEFAULT_MAX_MB = 2048
# Packing all weights costs about what four steps save. Masked denoising time plain / packed on the
# bench-wide model (hidden size 1024, one thread), at mask ratios 0.05 and 0.11: 2 steps 0.83 and 0.85,
# 4 steps 0.99 and 1.03, 8 steps 1.07 and 1.09. Requests with fewer steps than this stay plain.
MIN_PACKED_STEPS = 6


def packing_enabled() -> bool:
    return os.environ.get("EDITOR_PACK_WEIGHTS", "1").strip().lower() not in ("0", "false", "no", "off")


def max_packed_bytes() -> int:
    raw = os.environ.get("EDITOR_PACK_WEIGHTS_MAX_MB", "").strip()
    try:
        megabytes = int(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise ValueError(f"EDITOR_PACK_WEIGHTS_MAX_MB={raw!r} is not a whole number of megabytes; use e.g. 2048.") from None
    return max(megabytes, 0) * 2**20


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _PackedForward:
    """Forward of one `nn.Linear` that packs its weight per row count on first use."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int) -> None:
        self.linear = linear
        self.min_rows = min_rows
        self.packed: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        weight = self.linear.weight
        if rows < self.min_rows or x.dtype != weight.dtype or x.device != weight.device:
            return torch.nn.functional.linear(x, weight, self.linear.bias)
        packed = self.packed.get(rows)
        if packed is None:
            packed = self.packed[rows] = pack_weight(weight, rows)
        return torch.ops.mkl._mkl_linear(x, packed, weight, self.linear.bias, rows)


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's packed copy of an (out, in) weight for inputs of `rows` rows."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def packable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Return the model's float32 CPU linear layers, or none when packing is off, unavailable or over budget."""
    if not packing_enabled() or not mkl_packing_available():
        return []
    # Layers whose forward something else already replaced (accelerate's offload hooks) keep it.
    linears = [
        module for module in model.modules() if isinstance(module, torch.nn.Linear) and "forward" not in vars(module)
    ]
    if not linears or any(linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32 for linear in linears):
        return []
    weight_bytes = sum(linear.weight.numel() * linear.weight.element_size() for linear in linears)
    return linears if weight_bytes <= max_packed_bytes() else []


@contextmanager
def packed_linears(model: torch.nn.Module, min_rows: int | None = None) -> Iterator[int]:
    """Run the model's linear layers on per-request packed weights inside the context; yield how many layers.

    Calls with fewer than `min_rows` rows (default `MIN_PACKED_ROWS`) stay plain.
    """
    linears = packable_linears(model)
    for linear in linears:
        linear.forward = _PackedForward(linear, MIN_PACKED_ROWS if min_rows is None else min_rows)  # type: ignore[method-assign]
    try:
        yield len(linears)
    finally:
        for linear in linears:
            del linear.forward
