"""One edit on a worker: working-size inputs, the family's stock or masked computation, then compositing."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from editing.imaging import composite, crop_to, dilate, feather_alpha, fit_working_size, pad_to_multiple
from workers import batching
from workers.masked.activations import BlockCacheSource, TemplateActivations
from workers.model_loading import LoadedModel

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Progress hook called as (steps_done, steps_total) after every denoising step; may raise JobCancelled."""


class JobCancelled(Exception):
    """Raised by a step callback to stop an edit; `run_edit` lets it propagate unchanged."""


@dataclass
class EditRequest:
    """One edit: the upright image, the region to regenerate and the sampling parameters."""

    image: np.ndarray  # (H, W, 3) uint8, upright
    mask: np.ndarray  # (H, W) bool, True marks pixels to regenerate
    prompt: str
    seed: int
    steps: int
    guidance: float


@dataclass
class EditResult:
    """The composited image and where the time went."""

    image: np.ndarray  # (H, W, 3) uint8, same size as the request image
    # Milliseconds per phase: preprocess, denoise (includes prompt and masked-image encoding), decode, composite.
    timings_ms: dict[str, float]
    working_size: tuple[int, int]  # (width, height) the model ran at, after downscaling and padding


@dataclass(frozen=True)
class RunnerSettings:
    """Tunables of the stock edit, read from the environment by `from_env`."""

    max_work_pixels: int = 1024 * 1024  # padded model resolution limit, in pixels
    feather_px: int = 8  # width of the blend ramp outside the mask, in pixels
    dilate_px: int = 0  # growth of the mask before feathering, in pixels
    max_sequence_length: int = 128  # T5 prompt tokens; editing prompts are short
    dilation_tokens: int = 1  # growth of the recomputed token region around the mask, in tokens

    @classmethod
    def from_env(cls) -> RunnerSettings:
        """Read EDITOR_MAX_WORK_PIXELS, EDITOR_FEATHER_PX, EDITOR_MASK_DILATE_PX, EDITOR_MAX_SEQUENCE_LENGTH
        and EDITOR_MASK_DILATION_TOKENS."""
        return cls(
            max_work_pixels=_env_int("EDITOR_MAX_WORK_PIXELS", cls.max_work_pixels, minimum=16 * 16),
            feather_px=_env_int("EDITOR_FEATHER_PX", cls.feather_px, minimum=0),
            dilate_px=_env_int("EDITOR_MASK_DILATE_PX", cls.dilate_px, minimum=0),
            max_sequence_length=_env_int("EDITOR_MAX_SEQUENCE_LENGTH", cls.max_sequence_length, minimum=1),
            dilation_tokens=_env_int("EDITOR_MASK_DILATION_TOKENS", cls.dilation_tokens, minimum=0),
        )

    @property
    def keep_px(self) -> int:
        """Distance from the mask beyond which output pixels are bit-identical to the input."""
        return self.dilate_px + self.feather_px


@dataclass
class WorkingInputs:
    image: Image.Image  # padded RGB at working resolution
    mask: Image.Image  # padded L (0 or 255) at working resolution
    resized: tuple[int, int]  # (width, height) before padding
    padded: tuple[int, int]  # (width, height) after padding


def run_edit(
    model: LoadedModel,
    request: EditRequest,
    on_step: StepCallback | None = None,
    *,
    settings: RunnerSettings | None = None,
    activations: TemplateActivations | None = None,
    block_source: BlockCacheSource | None = None,
    full_prefix_blocks: int = 0,
    keep_alive: Callable[[], None] | None = None,
) -> EditResult:
    """Regenerate the masked region of `request.image` with the model's stock pipeline.

    The image is downscaled when its padded size exceeds `settings.max_work_pixels`, padded bottom/right to
    the family's working multiple (16 for Flux), denoised, cropped and upscaled back to the input size. Outside
    `dilate(mask, dilate_px + feather_px)` every output pixel is a bit-identical copy of the input.
    With `activations` (a warm-up of this template at the same working size, seed, steps and guidance)
    only the masked tokens are computed and the rest is read from the cache: from `block_source` when
    given (a loader streaming blocks from disk), with the first `full_prefix_blocks` blocks of each step
    computed in full while later blocks load. `keep_alive` is called every few seconds while the edit
    waits for another run to release the model.
    Raises ValueError for malformed requests and lets JobCancelled from `on_step` propagate.
    """
    settings = settings or RunnerSettings.from_env()
    _validate(request)
    timings: dict[str, float] = {}
    height, width = request.mask.shape

    start = time.perf_counter()
    inputs = prepare_working_inputs(request.image, request.mask, settings.max_work_pixels, model.working_multiple)
    timings["preprocess"] = _elapsed_ms(start)

    batched = activations is not None and not full_prefix_blocks and batching.batching_enabled(model)
    # The batching engine takes the model's lock for each of its steps; every other run holds it throughout.
    with (nullcontext() if batched else model.hold(keep_alive)), timed_decode(model.pipe) as decode_ms:
        start = time.perf_counter()
        if activations is None:
            generated = model.family.stock_edit(
                model.pipe, inputs.image, inputs.mask, request.prompt, seed=request.seed, steps=request.steps,
                guidance_scale=request.guidance, max_sequence_length=settings.max_sequence_length, on_step=on_step,
            )
        elif batched:
            generated = batching.masked_edit(
                model, activations, np.asarray(inputs.image), np.asarray(inputs.mask) > 127, request.prompt,
                seed=request.seed, steps=request.steps, guidance_scale=request.guidance,
                max_sequence_length=settings.max_sequence_length, dilation=settings.dilation_tokens,
                on_step=on_step, block_source=block_source,
            ).generated
        else:
            generated = _masked(model, request, inputs, settings, activations, on_step, block_source, full_prefix_blocks)
        total_ms = _elapsed_ms(start)
    timings["denoise"] = total_ms - decode_ms[0]
    timings["decode"] = decode_ms[0]

    start = time.perf_counter()
    generated = crop_to(generated, inputs.resized[1], inputs.resized[0])
    if inputs.resized != (width, height):
        generated = np.asarray(Image.fromarray(generated).resize((width, height), Image.Resampling.LANCZOS))
    region = dilate(request.mask, settings.dilate_px) if settings.dilate_px else request.mask
    alpha = feather_alpha(region, settings.feather_px)
    result = composite(request.image, generated, alpha)
    timings["composite"] = _elapsed_ms(start)

    logger.info(
        "Edit of %dx%d at working size %dx%d with %d steps: %s",
        width, height, inputs.padded[0], inputs.padded[1], request.steps,
        " ".join(f"{phase}={ms:.0f}ms" for phase, ms in timings.items()),
    )
    return EditResult(image=result, timings_ms=timings, working_size=inputs.padded)


def _validate(request: EditRequest) -> None:
    image, mask = request.image, request.mask
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"request.image has shape {image.shape} and dtype {image.dtype}; pass (H, W, 3) uint8")
    if mask.shape != image.shape[:2] or mask.dtype != np.bool_:
        raise ValueError(
            f"request.mask has shape {mask.shape} and dtype {mask.dtype}; pass (H, W) bool matching the image "
            f"{image.shape[:2]}"
        )
    if request.steps < 1:
        raise ValueError(f"request.steps={request.steps} must be at least 1")


def prepare_working_inputs(image: np.ndarray, mask: np.ndarray, max_work_pixels: int, multiple: int) -> WorkingInputs:
    """Downscale (above `max_work_pixels`) and pad image and mask to the model's working size.

    Warm-ups call this too, with an empty mask, so cached activations line up with later jobs.
    """
    height, width = mask.shape
    work_width, work_height = fit_working_size(width, height, max_work_pixels, multiple)
    if (work_width, work_height) != (width, height):
        image = np.asarray(Image.fromarray(image).resize((work_width, work_height), Image.Resampling.LANCZOS))
        # Bilinear coverage above zero keeps every partly masked pixel masked, so downscaling never drops a
        # thin stroke from the region the model regenerates.
        coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize((work_width, work_height), Image.Resampling.BILINEAR)
        mask = np.asarray(coverage) > 0

    padded_image, _ = pad_to_multiple(image, multiple)
    padded_mask, _ = pad_to_multiple(mask, multiple)
    return WorkingInputs(
        image=Image.fromarray(padded_image),
        mask=Image.fromarray(padded_mask.astype(np.uint8) * 255, mode="L"),
        resized=(work_width, work_height),
        padded=(padded_image.shape[1], padded_image.shape[0]),
    )


def _masked(
    model: LoadedModel,
    request: EditRequest,
    inputs: WorkingInputs,
    settings: RunnerSettings,
    activations: TemplateActivations,
    on_step: StepCallback | None,
    block_source: BlockCacheSource | None,
    full_prefix_blocks: int,
) -> np.ndarray:
    """Denoise only the masked tokens over the cached template activations; return the decoded padded image."""
    streaming = {}
    if block_source is not None or full_prefix_blocks:
        # Only families that stream disk entries under a load plan take these.
        streaming = {"block_source": block_source, "full_prefix_blocks": full_prefix_blocks}
    output = model.family.masked_edit(
        model.pipe,
        activations,
        np.asarray(inputs.image),
        np.asarray(inputs.mask) > 127,
        request.prompt,
        seed=request.seed,
        steps=request.steps,
        guidance_scale=request.guidance,
        max_sequence_length=settings.max_sequence_length,
        dilation=settings.dilation_tokens,
        on_step=on_step,
        **streaming,
    )
    return output.generated


_decode_clock = threading.local()


@contextmanager
def timed_decode(pipe: Any) -> Iterator[list[float]]:
    """Measure the milliseconds this thread spends in `pipe.vae.decode` inside the block.

    Every family decodes through `pipe.vae.decode`. It is wrapped once per VAE with a timer that adds to a
    per-thread total, so job threads decoding at the same time each see only their own time.
    """
    vae = pipe.vae
    if not getattr(vae, "_editor_decode_timer", False):
        original = vae.decode

        def decode(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _decode_clock.ms = getattr(_decode_clock, "ms", 0.0) + _elapsed_ms(start)

        vae.decode = decode
        vae._editor_decode_timer = True
    before = getattr(_decode_clock, "ms", 0.0)
    spent = [0.0]
    try:
        yield spent
    finally:
        spent[0] = getattr(_decode_clock, "ms", 0.0) - before


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _env_int(name: str, default: int, *, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; set it to a whole number such as {default}") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is below the minimum {minimum}; set it to {minimum} or more")
    return value
