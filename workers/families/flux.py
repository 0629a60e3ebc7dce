"""Flux Fill (FluxFillPipeline, a 384-channel MMDiT) on the model-family interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from workers.demo_model import build_flux_fill_demo
from workers.families.base import MaskedOutput, ModelFamily, StepCallback
from workers.masked.activations import BlockCacheSource, TemplateActivations
from workers.masked.edit import decode_latents, run_cached_edit
from workers.masked.flops import TransformerShape, transformer_flops
from workers.masked.warmup import warm_up_template


class FluxFamily(ModelFamily):
    """Flux Fill: 2x2-packed 16-channel latents, so one token covers 16x16 pixels; rotary positions."""

    name: ClassVar[str] = "flux"
    pipeline_class: ClassVar[type] = FluxFillPipeline
    variants: ClassVar[tuple[str, ...]] = ("kv", "hidden")
    streams_from_disk: ClassVar[bool] = True

    def build_demo(self, folder: Path, preset: str, *, seed: int = 0) -> None:
        build_flux_fill_demo(folder, preset=preset, seed=seed)

    def load(self, folder: Path | str, *, dtype: torch.dtype, device: torch.device) -> Any:
        pipe = FluxFillPipeline.from_pretrained(folder, dtype=dtype)
        pipe.to(device)
        if device.type == "cpu":
            # The VAE's convolutions run about twice as fast in channels-last layout on CPU, as measured with
            # bench.mask_latency on 2 cores. The values are the same up to float rounding.
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def working_multiple(self, pipe: Any) -> int:
        return self.pixels_per_token(pipe)

    def pixels_per_token(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2

    def native_resolution(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        return max_sequence_length

    def flop_fraction(
        self, pipe: Any, *, height: int, width: int, token_mask: np.ndarray, text_tokens: int, variant: str
    ) -> float:
        shape = TransformerShape.from_config(pipe.transformer.config)
        image_tokens = int(np.asarray(token_mask).size)
        masked_tokens = int(np.asarray(token_mask).sum())
        # Against the masked pass with every image token recomputed, so the fraction is what the cache saves:
        # the last block's dropped text work (workers.masked.text_keys) is saved at any mask.
        full = transformer_flops(shape, text_tokens, image_tokens, image_tokens, variant)  # type: ignore[arg-type]
        masked = transformer_flops(shape, text_tokens, image_tokens, masked_tokens, variant)  # type: ignore[arg-type]
        return min(1.0, masked / full)

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
        def step_end(pipeline: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, pipeline.num_timesteps)
            return callback_kwargs

        width, height = image.size
        # Seeding a CPU generator gives the same noise on every device for the same seed.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.inference_mode():
            output = pipe(
                prompt=prompt,
                image=image,
                mask_image=mask,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                max_sequence_length=max_sequence_length,
                output_type="latent",
                callback_on_step_end=step_end,
            )
        return decode_latents(pipe, output.images[0], height, width)

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
        return warm_up_template(
            pipe,
            image,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            variant=variant,  # type: ignore[arg-type]
            prompt=prompt,
            max_sequence_length=max_sequence_length,
            on_progress=on_progress,
        )

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
        block_source: BlockCacheSource | None = None,
        full_prefix_blocks: int = 0,
    ) -> MaskedOutput:
        """As the interface says; `block_source` and `full_prefix_blocks` stream a disk entry under a load plan."""
        cached = run_cached_edit(
            pipe,
            activations,
            image,
            mask,
            prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            dilation=dilation,
            feather_px=0,
            full_prefix_blocks=full_prefix_blocks,
            block_source=block_source,
            on_step=on_step,
        )
        return MaskedOutput(generated=cached.generated, latents=cached.latents)

