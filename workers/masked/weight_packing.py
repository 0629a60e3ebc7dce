"""Linear weights packed once per process for MKL's GEMM on CPU, used by masked passes.

A plain float32 `F.linear` on CPU repacks the weight matrix into the GEMM kernel's layout on every call.
With thousands of rows that copy is small next to the arithmetic. A masked pass, though, multiplies a few
hundred rows (text and masked tokens) by each weight, once per step, so the copy becomes a large part of
each call. On a 2-core x86 machine, projections of 113 rows ran at 80-85% of the rate of 1152 rows.

`packed_linears` runs a model's linear layers on packed copies of their weights
(`torch.ops.mkl._mkl_linear`, the kernel PyTorch's compiler uses for frozen CPU models). A layer's weight
is packed on the first call that needs it and the copy is kept for the life of the layer, so later steps
and later requests reuse it. MKL's packed layout of a weight does not depend on the row count it is packed
for: one copy serves every row count. `mkl_packing_available` checks this once per process on a small
weight, and packing stays off where it does not hold. A copy is made again when its weight changes in
place or is replaced (its version counter or storage changes).

Packing applies on CPU, in float32, where PyTorch has MKL, and when the packed copies of all models in the
process fit `EDITOR_PACK_WEIGHTS_MAX_MB`, because each copy takes about as much memory as its weight.
`EDITOR_PACK_WEIGHTS=0` turns it off. Results equal plain `F.linear` up to float rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Projections with fewer rows stay plain, because such small calls (per-step embeddings) are few.
MIN_PACKED_ROWS = 16
DEFAULT_MAX_MB = 2048
# The row count passed to MKL when packing. The layout does not depend on it (checked at first use).
PACKING_ROWS_HINT = 256


@dataclass(frozen=True)
class _PackedCopy:
    version: int
    data_ptr: int
    tensor: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


_copies: weakref.WeakKeyDictionary[torch.nn.Linear, _PackedCopy] = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


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
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") and _layout_ignores_rows()


@functools.cache
def _layout_ignores_rows() -> bool:
    """Check that a weight packed for one row count multiplies another row count correctly."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator)
    x = torch.randn(37, 40, generator=generator)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACKING_ROWS_HINT)
    same_size = packed.shape == torch.ops.mkl._mkl_reorder_linear_weight(weight, 1).shape
    result = torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0])
    if same_size and torch.allclose(result, x @ weight.T, rtol=1e-4, atol=1e-5):
        return True
    logger.warning(
        "MKL packed-weight check failed: a weight packed for %d rows gave wrong results for 37 rows, so masked "
        "passes use plain linear layers.", PACKING_ROWS_HINT,
    )
    return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Return MKL's packed copy of an (out, in) float32 weight."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACKING_ROWS_HINT)


def packed_copy(linear: torch.nn.Linear) -> torch.Tensor:
    """Return the layer's packed weight, packing it when there is no copy or the weight changed since."""
    weight = linear.weight
    copy = _copies.get(linear)
    if copy is not None and copy.version == weight._version and copy.data_ptr == weight.data_ptr():
        return copy.tensor
    with _copies_lock:
        copy = _copies.get(linear)
        if copy is None or copy.version != weight._version or copy.data_ptr != weight.data_ptr():
            copy = _copies[linear] = _PackedCopy(weight._version, weight.data_ptr(), pack_weight(weight))
    return copy.tensor


def packed_bytes() -> int:
    """Return the bytes held by the packed copies of this process."""
    with _copies_lock:
        return sum(copy.nbytes for copy in _copies.values())


def forget_packed_copies() -> None:
    """Drop every packed copy; the next masked pass packs again."""
    with _copies_lock:
        _copies.clear()


class _PackedForward:
    """Forward of one `nn.Linear` on its packed weight."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int) -> None:
        self.linear = linear
        self.min_rows = min_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        weight = self.linear.weight
        if rows < self.min_rows or x.dtype != weight.dtype or x.device != weight.device:
            return torch.nn.functional.linear(x, weight, self.linear.bias)
        return torch.ops.mkl._mkl_linear(x, packed_copy(self.linear), weight, self.linear.bias, rows)


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
    held_elsewhere = packed_bytes() - sum(copy.nbytes for linear in linears if (copy := _copies.get(linear)) is not None)
    return linears if held_elsewhere + weight_bytes <= max_packed_bytes() else []


@contextmanager
def packed_linears(model: torch.nn.Module, min_rows: int | None = None) -> Iterator[int]:
    """Run the model's linear layers on packed weights inside the context; yield how many layers.

    Calls with fewer than `min_rows` rows (default `MIN_PACKED_ROWS`) stay plain. The packed copies outlive
    the context; the stock `nn.Linear` forwards are back in place after it.
    """
    linears = packable_linears(model)
    for linear in linears:
        linear.forward = _PackedForward(linear, MIN_PACKED_ROWS if min_rows is None else min_rows)  # type: ignore[method-assign]
    try:
        yield len(linears)
    finally:
        for linear in linears:
            del linear.forward
