"""Split of the packed Flux image tokens into masked (recomputed) and unmasked (cached) positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenLayout:
    """Indices into the row-major packed token sequence of a (grid_h, grid_w) token grid."""

    grid: tuple[int, int]
    masked: torch.Tensor
    unmasked: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_masked(self) -> int:
        return int(self.masked.numel())

    @property
    def ratio(self) -> float:
        """Fraction of image tokens that are recomputed."""
        return self.num_masked / self.num_tokens

    @classmethod
    def from_token_mask(cls, token_mask: np.ndarray | torch.Tensor) -> TokenLayout:
        """Build from a boolean (grid_h, grid_w) token mask. Raises ValueError when it selects no token."""
        mask = torch.as_tensor(np.asarray(token_mask), dtype=torch.bool)
        if mask.ndim != 2:
            raise ValueError(f"token_mask must have shape (grid_h, grid_w), got {tuple(mask.shape)}.")
        flat = mask.reshape(-1)
        if not bool(flat.any()):
            raise ValueError("token_mask selects no token. A masked edit needs at least one masked pixel.")
        masked = torch.nonzero(flat, as_tuple=False).reshape(-1)
        unmasked = torch.nonzero(~flat, as_tuple=False).reshape(-1)
        return cls(grid=(int(mask.shape[0]), int(mask.shape[1])), masked=masked, unmasked=unmasked)

    @classmethod
    def from_pixel_mask(cls, mask: np.ndarray, patch: int = 16, dilation: int = 1) -> TokenLayout:
        """Map a boolean (H, W) pixel mask to tokens of `patch` x `patch` pixels, conservatively and dilated."""
        from editing.imaging import token_mask

        return cls.from_token_mask(token_mask(mask, patch=patch, dilation=dilation))
