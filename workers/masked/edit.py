"""One masked edit request end to end: cached masked denoising, VAE decode and composite over the template."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from editing.imaging import composite, feather_alpha
from workers.masked.activations import BlockCacheSource, TemplateActivations
from workers.masked.conditioning import PromptEmbedding, encode_prompt
from workers.masked.inference import MaskedDenoiseInputs, StepCallback, denoise_masked, prepare_masked_inputs
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import to_pil_image

logger = logging.getLogger(__name__)

DEFAULT_FEATHER_PX = 8


@dataclass(frozen=True)
class CachedEditResult:
    """Composited result (H, W, 3) uint8, the decoded image before compositing, and the final packed latents."""

    image: np.ndarray
    generated: np.ndarray
    latents: torch.Tensor
    layout: TokenLayout


def mask_to_pil(mask: np.ndarray) -> Image.Image:
    """Convert a boolean (H, W) mask to the 0/255 grayscale image the Flux Fill mask processor expects."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {array.shape}.")
    return Image.fromarray(array.astype(bool).astype(np.uint8) * 255, mode="L")


def decode_latents(pipe: FluxFillPipeline, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Decode packed latents (N_img, 64) to a uint8 (H, W, 3) image exactly as the stock pipeline does."""
    with torch.inference_mode():
        spatial = pipe._unpack_latents(latents.unsqueeze(0), height, width, pipe.vae_scale_factor)
        spatial = (spatial / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(spatial.to(pipe.vae.dtype), return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    # Same rounding as VaeImageProcessor.numpy_to_pil, so the result equals the stock "pil" output.
    return (pixels * 255).round().astype(np.uint8)


Denoiser = Callable[[MaskedDenoiseInputs], torch.Tensor]


@dataclass(frozen=True)
class DecodedEdit:
    """Denoising inputs of one request, its final packed latents and the decoded (H, W, 3) uint8 image."""

    inputs: MaskedDenoiseInputs
    latents: torch.Tensor
    generated: np.ndarray


def denoise_and_decode(
    pipe: FluxFillPipeline,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str | PromptEmbedding,
    denoise: Denoiser,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    dilation: int,
) -> DecodedEdit:
    """Build a masked request's inputs (token layout, prompt, masked-image conditioning), denoise, decode.

    `denoise` maps the inputs to final packed latents: `denoise_masked` directly, or a batching engine.
    """
    template = to_pil_image(image)
    layout = TokenLayout.from_pixel_mask(np.asarray(mask, dtype=bool), patch=2 * pipe.vae_scale_factor, dilation=dilation)
    embedding = prompt if isinstance(prompt, PromptEmbedding) else encode_prompt(pipe, prompt, max_sequence_length)
    inputs = prepare_masked_inputs(
        pipe, template, mask_to_pil(mask), embedding, layout, seed=seed, steps=steps, guidance_scale=guidance_scale
    )
    latents = denoise(inputs)
    generated = decode_latents(pipe, latents, inputs.height, inputs.width)
    logger.debug("Masked edit recomputed %d of %d tokens", layout.num_masked, layout.num_tokens)
    return DecodedEdit(inputs=inputs, latents=latents, generated=generated)


def run_cached_edit(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str | PromptEmbedding,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    max_sequence_length: int = 512,
    full_prefix_blocks: int = 0,
    dilation: int = 1,
    feather_px: int = DEFAULT_FEATHER_PX,
    block_source: BlockCacheSource | None = None,
    on_step: StepCallback | None = None,
) -> CachedEditResult:
    """Edit the masked region of `image` (the template `activations` were recorded on) and composite it.

    Tokens of 16x16 pixels that touch `mask`, dilated by `dilation` tokens, are recomputed. Pixels where the
    feathered mask weight is 0 (farther than `feather_px` from the mask) are copied from `image` unchanged.
    """

    def denoise(inputs: MaskedDenoiseInputs) -> torch.Tensor:
        return denoise_masked(
            pipe, activations, inputs, full_prefix_blocks=full_prefix_blocks, block_source=block_source, on_step=on_step
        )

    edit = denoise_and_decode(
        pipe, image, mask, prompt, denoise,
        seed=seed, steps=steps, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, dilation=dilation,
    )
    original = np.asarray(to_pil_image(image), dtype=np.uint8)
    result = composite(original, edit.generated, feather_alpha(np.asarray(mask, dtype=bool), feather_px))
    return CachedEditResult(image=result, generated=edit.generated, latents=edit.latents, layout=edit.inputs.layout)
