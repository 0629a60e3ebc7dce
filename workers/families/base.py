"""What a model family must provide so the worker can serve it with the shared cache, routing and benchmarks.

A family wraps one stock diffusers inpainting pipeline class. The worker never touches pipeline internals
itself: it calls the family to run the stock edit, to warm a template up (one full run that records
activations) and to run a masked edit over those activations. Activations use the shared
`TemplateActivations` format (per step and block: `k`, `v` and/or `hidden` tensors, plus the latent
trajectory), so the cache store, its codecs and its disk tier work for every family unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from workers.masked.activations import TemplateActivations

StepCallback = Callable[[int, int], None]
"""Called as (steps_done, steps_total) after every denoising step; may raise to stop the run."""

DEMO_PRESETS = ("test", "demo", "bench")


@dataclass(frozen=True)
class MaskedOutput:
    """A masked edit before compositing.

    `generated` is the decoded (H, W, 3) uint8 image at the working size. `latents` are the final latents in
    the family's own layout, the same layout as `TemplateActivations.latents[-1]`.
    """

    generated: np.ndarray
    latents: torch.Tensor


class ModelFamily(ABC):
    """One diffusers inpainting pipeline family (Flux Fill, SD3, SDXL, SD 2)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    variants: ClassVar[tuple[str, ...]]
    # Whether disk-tier entries may stream block by block under a load plan (else they load whole).
    streams_from_disk: ClassVar[bool] = False

    @abstractmethod
    def build_demo(self, folder: Path, preset: str, *, seed: int = 0) -> None:
        """Save a small pipeline with seeded, re-initialized weights to `folder` (diffusers layout, no download)."""

    def load(self, folder: Path | str, *, dtype: torch.dtype, device: torch.device) -> Any:
        """Load the pipeline with the stock `from_pretrained`, so real checkpoints load the same way."""
        pipe = self.pipeline_class.from_pretrained(folder, dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @abstractmethod
    def working_multiple(self, pipe: Any) -> int:
        """Pixels that working widths and heights must be a multiple of."""

    @abstractmethod
    def pixels_per_token(self, pipe: Any) -> int:
        """Side in pixels of one image token at the finest level that masked computation selects."""

    @abstractmethod
    def native_resolution(self, pipe: Any) -> int:
        """Return the side length in pixels the model was built for (e.g. 1024 for SDXL)."""

    @abstractmethod
    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        """Return the text tokens that each attention or cross-attention layer receives per request."""

    @abstractmethod
    def flop_fraction(
        self, pipe: Any, *, height: int, width: int, token_mask: np.ndarray, text_tokens: int, variant: str
    ) -> float:
        """Denoiser FLOPs of a masked step over those of the same step with every image token recomputed.

        1.0 when the cache saves nothing; the routing rule and the job's `flop_fraction` use this.
        """

    @abstractmethod
    def stock_edit(
        self,
        pipe: Any,
        image: Image.Image,
        mask: Image.Image,
        prompt: str,
        *,
        seed: int,
        steps: int,
        guidance_scale: float,
        max_sequence_length: int,
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """Run the stock pipeline on `image` (RGB) and `mask` (L, 255 = regenerate); return (H, W, 3) uint8."""

    @abstractmethod
    def warm_up(
        self,
        pipe: Any,
        image: np.ndarray,
        *,
        seed: int,
        steps: int,
        guidance_scale: float,
        variant: str,
        prompt: str,
        max_sequence_length: int,
        on_progress: StepCallback | None = None,
    ) -> TemplateActivations:
        """Run the stock pipeline on the template with nothing masked and record its activations."""

    @abstractmethod
    def masked_edit(
        self,
        pipe: Any,
        activations: TemplateActivations,
        image: np.ndarray,
        mask: np.ndarray,
        prompt: str,
        *,
        seed: int,
        steps: int,
        guidance_scale: float,
        max_sequence_length: int,
        dilation: int,
        on_step: StepCallback | None = None,
    ) -> MaskedOutput:
        """Recompute only the tokens `mask` (H, W) bool touches, reading the rest from `activations`."""
