"""Per-request latency of cached masked edits against each family's stock diffusers pipeline, by mask ratio.

Run `python -m bench.mask_latency` (every family, writes docs/benchmarks/mask_latency.{json,md,png}),
`python -m bench.mask_latency --family sd3` (one family; its rows replace that family's rows in the JSON) or
`python -m bench.mask_latency --quick` (Flux test model, under a minute, writes under var/bench/).
A request is timed from the uint8 template and mask to PNG bytes of the composited result. Warm-up
(cache building) is excluded from request latency and reported separately.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On a machine shared with other processes, spinning threads
# of both paths lose their time slices at every barrier, and the many small operations of the masked path
# suffer most. Set before torch loads its OpenMP runtime, which reads the variable once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from editing.imaging import composite, encode_png, feather_alpha, token_mask
from workers.demo_model import PRESETS, ensure_demo_model
from workers.families import FAMILY_CLASSES, get_family
from workers.families.base import ModelFamily
from workers.masked.activations import TemplateActivations
from workers.masked.conditioning import encode_prompt, guidance_tensor, latent_image_ids, prepare_timesteps
from workers.masked.edit import mask_to_pil, run_cached_edit
from workers.masked.flops import TransformerShape, flop_speedup_limit, transformer_flops
from workers.masked.inference import predict_noise
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import warm_up_template
from workers.masked.weight_packing import packed_linears

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = REPO_ROOT / "demo" / "photos" / "astronaut.png"
SIZE = 512
SEED = 0
GUIDANCE = 30.0
FEATHER_PX = 8
DILATION_TOKENS = 1
WARMUP_PROMPT = ""
EDIT_PROMPT = "replace the helmet with a bouquet of red flowers"
# Same rule as BYPASS_FLOP_FRACTION of the worker's cache policy (workers/caching.py, which imports Django
# models): a masked pass that still needs at least 90% of the full transformer FLOPs runs the stock computation.
STOCK_ROUTE_FLOP_FRACTION = 0.9


@dataclass(frozen=True)
class BenchConfig:
    preset: str  # demo model preset of the SD3, SDXL and SD 2 families
    flux_preset: str
    steps: int
    ratios: tuple[float, ...]
    text_lengths: tuple[int, ...]
    repeats: int
    out_dir: Path
    quick: bool = False


@dataclass(frozen=True)
class Row:
    family: str
    text_tokens: int
    mask_ratio: float
    target_ratio: float
    baseline_s: float
    cached_s: float
    speedup: float
    baseline_cpu_s: float
    cached_cpu_s: float
    flop_speedup_limit: float
    masked_rel_diff: float
    path: str
    # Flux only: FLOPs of the whole stock request over the whole cached request (see `request_flop_limit`).
    request_flop_limit: float | None = None


def full_config(quick: bool) -> BenchConfig:
    if quick:
        return BenchConfig("test", "test", 2, (0.11, 1.0), (128,), 1, REPO_ROOT / "var" / "bench", quick=True)
    # Flux runs at hidden size 1024 with 12 blocks, where the transformer outweighs the VAE and prompt work
    # that every request does on both paths.
    return BenchConfig(
        "bench", "bench-large", 8, (0.05, 0.11, 0.19, 0.35, 0.5, 1.0), (128, 512), 3, REPO_ROOT / "docs" / "benchmarks"
    )


def brush_mask(target_ratio: float, size: int = SIZE, patch: int = 16) -> np.ndarray:
    """Return an elliptical brush mask whose dilated token mask covers about `target_ratio` of the tokens."""
    if target_ratio >= 1.0:
        return np.ones((size, size), dtype=bool)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    center_row, center_col = 0.42 * size, 0.5 * size

    def mask_for(radius: float) -> np.ndarray:
        # A 1.3:1 ellipse, taller than wide, like a brush stroke over a face or an object.
        return ((rows - center_row) / (1.3 * radius)) ** 2 + ((cols - center_col) / radius) ** 2 <= 1.0

    low, high = 1.0, float(size)
    for _ in range(40):
        radius = (low + high) / 2
        ratio = token_mask(mask_for(radius), patch=patch, dilation=DILATION_TOKENS).mean()
        if ratio < target_ratio:
            low = radius
        else:
            high = radius
    candidates = [mask_for(low), mask_for(high)]
    errors = [abs(token_mask(m, patch=patch, dilation=DILATION_TOKENS).mean() - target_ratio) for m in candidates]
    return candidates[int(np.argmin(errors))]


def load_template() -> np.ndarray:
    image = Image.open(TEMPLATE_PATH).convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class LatentCapture:
    """Final packed latents (N_img, 64) of the last request that stored them."""

    latents: torch.Tensor | None = None


def stock_request(
    pipe: FluxFillPipeline,
    image: np.ndarray,
    mask: np.ndarray,
    text_tokens: int,
    steps: int,
    capture: LatentCapture | None = None,
) -> bytes:
    """Stock diffusers request: FluxFillPipeline.__call__, composite outside the feathered mask, PNG."""

    def keep_final_latents(_pipe: FluxFillPipeline, index: int, _t: torch.Tensor, tensors: dict) -> dict:
        if capture is not None and index == steps - 1:
            capture.latents = tensors["latents"][0].clone()
        return {}

    output = pipe(
        prompt=EDIT_PROMPT,
        image=Image.fromarray(image),
        mask_image=mask_to_pil(mask),
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator(device="cpu").manual_seed(SEED),
        max_sequence_length=text_tokens,
        callback_on_step_end=keep_final_latents if capture is not None else None,
    )
    generated = np.asarray(output.images[0], dtype=np.uint8)
    return encode_png(composite(image, generated, feather_alpha(mask, FEATHER_PX)))


def worker_request(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    image: np.ndarray,
    mask: np.ndarray,
    text_tokens: int,
    steps: int,
    stock_route: bool,
    capture: LatentCapture | None = None,
) -> bytes:
    """Worker request: the cached masked path, or the stock path when the plan routes the mask there."""
    if stock_route:
        return stock_request(pipe, image, mask, text_tokens, steps)
    result = run_cached_edit(
        pipe,
        activations,
        image,
        mask,
        EDIT_PROMPT,
        seed=SEED,
        steps=steps,
        guidance_scale=GUIDANCE,
        max_sequence_length=text_tokens,
        dilation=DILATION_TOKENS,
        feather_px=FEATHER_PX,
    )
    if capture is not None:
        capture.latents = result.latents
    return encode_png(result.image)


def flops_outside_transformer(request: Callable[[], object]) -> float:
    """Count the FLOPs of one request outside FluxTransformer2DModel's forward (VAE, text encoders).

    Counted by torch.utils.flop_counter, which counts matrix products and convolutions. The transformer's
    own FLOPs come from the analytic count, which includes attention.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        request()
    inside = counter.get_flop_counts().get("FluxTransformer2DModel", {})
    return float(counter.get_total_flops() - sum(inside.values()))


def request_flop_limit(
    shape: TransformerShape, text_tokens: int, layout: TokenLayout, variant: str, steps: int, outside: dict[str, float]
) -> float:
    """Return whole-request FLOPs stock / cached: the transformer passes plus each side's VAE and text encoders."""
    full = steps * transformer_flops(shape, text_tokens, layout.num_tokens) + outside["stock"]
    masked = steps * transformer_flops(shape, text_tokens, layout.num_tokens, layout.num_masked, variant)  # type: ignore[arg-type]
    return full / (masked + outside["cached"])


def packed_full_pass_speedup(pipe: FluxFillPipeline, text_tokens: int, steps: int) -> float | None:
    """Time `steps` all-token transformer passes with plain and with packed linear weights.

    The masked path packs its weights (workers/masked/weight_packing.py), and this ratio is the part of a row's
    speedup that packing alone would give the stock computation. Return None when packing does not apply here.
    """
    embedding = encode_prompt(pipe, EDIT_PROMPT, text_tokens)
    timesteps = prepare_timesteps(pipe, SIZE, SIZE, steps)
    guidance = guidance_tensor(pipe, GUIDANCE)
    image_ids = latent_image_ids(pipe, SIZE, SIZE, embedding.prompt_embeds.dtype)
    generator = torch.Generator().manual_seed(SEED)
    hidden_states = torch.randn(1, image_ids.shape[0], pipe.transformer.config.in_channels, generator=generator)

    def passes() -> None:
        for t in timesteps:
            predict_noise(pipe.transformer, hidden_states, t, guidance, embedding, image_ids)

    def packed_passes() -> int:
        with packed_linears(pipe.transformer) as count:
            passes()
        return count

    with torch.inference_mode():
        if not packed_passes():
            return None
        plain_s, _ = timed(passes)
        packed_s, _ = timed(packed_passes)
    return round(plain_s / packed_s, 3)


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """Return (wall-clock seconds, CPU seconds of this process) of one call."""
    start_cpu = time.process_time()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start, time.process_time() - start_cpu


def relative_difference_on(masked: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 difference of packed latents (N_img, 64) on the token indices `masked`."""
    difference = torch.linalg.vector_norm(actual[masked] - expected[masked])
    return float(difference / torch.linalg.vector_norm(expected[masked]))


def measure_row(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    image: np.ndarray,
    target_ratio: float,
    text_tokens: int,
    config: BenchConfig,
    outside: dict[str, float],
) -> Row:
    mask = brush_mask(target_ratio)
    tokens = token_mask(mask, patch=2 * pipe.vae_scale_factor, dilation=DILATION_TOKENS)
    layout = TokenLayout.from_token_mask(tokens)
    shape = TransformerShape.from_config(pipe.transformer.config)
    variant = activations.metadata.variant
    fraction = get_family("flux").flop_fraction(
        pipe, height=SIZE, width=SIZE, token_mask=tokens, text_tokens=text_tokens, variant=variant
    )
    stock_route = fraction >= STOCK_ROUTE_FLOP_FRACTION

    baseline_times: list[tuple[float, float]] = []
    cached_times: list[tuple[float, float]] = []
    ratios: list[float] = []
    full = LatentCapture()
    cached = LatentCapture()
    for repeat in range(config.repeats):
        # Back-to-back pairs, so load from other processes affects both sides of each ratio alike. The order
        # alternates so that neither side always runs right after the other's allocations.
        run_baseline = lambda: timed(lambda: stock_request(pipe, image, mask, text_tokens, config.steps, full))  # noqa: E731
        run_cached = lambda: timed(  # noqa: E731
            lambda: worker_request(pipe, activations, image, mask, text_tokens, config.steps, stock_route, cached)
        )
        if repeat % 2 == 0:
            baseline_time = run_baseline()
            cached_time = run_cached()
        else:
            cached_time = run_cached()
            baseline_time = run_baseline()
        baseline_times.append(baseline_time)
        cached_times.append(cached_time)
        ratios.append(baseline_time[0] / cached_time[0])

    rel_diff = 0.0
    if not stock_route:
        assert full.latents is not None and cached.latents is not None
        rel_diff = relative_difference_on(layout.masked, cached.latents, full.latents)
    limit = 1.0 if stock_route else flop_speedup_limit(shape, text_tokens, layout.num_tokens, layout.num_masked, variant)
    request_limit = 1.0 if stock_route else request_flop_limit(shape, text_tokens, layout, variant, config.steps, outside)
    row = Row(
        family="flux",
        text_tokens=text_tokens,
        mask_ratio=round(layout.ratio, 4),
        target_ratio=target_ratio,
        baseline_s=round(statistics.median(wall for wall, _ in baseline_times), 4),
        cached_s=round(statistics.median(wall for wall, _ in cached_times), 4),
        speedup=round(statistics.median(ratios), 3),
        baseline_cpu_s=round(statistics.median(cpu for _, cpu in baseline_times), 4),
        cached_cpu_s=round(statistics.median(cpu for _, cpu in cached_times), 4),
        flop_speedup_limit=round(limit, 3),
        masked_rel_diff=round(rel_diff, 5),
        path="stock" if stock_route else "cached",
        request_flop_limit=round(request_limit, 3),
    )
    logger.info("%s", row)
    return row


# Text tokens that each family's attention layers receive per row. Flux: T5 tokens at the short-prompt and default lengths.
# SD3: 77 CLIP tokens plus T5 tokens, so 128 in all (51 T5) and the pipeline default (77 + 256).
# UNet families cross-attend to 77 CLIP tokens.
FAMILY_TEXT_LENGTHS: dict[str, tuple[int, ...]] = {"sd3": (128, 333), "sdxl": (77,), "sd2": (77,)}
SD3_CLIP_TOKENS = 77


def family_sequence_length(family: str, text_tokens: int) -> int:
    """Return the pipeline's max_sequence_length argument that gives `text_tokens` attention text tokens."""
    return text_tokens - SD3_CLIP_TOKENS if family == "sd3" else text_tokens


def family_stock_request(adapter: ModelFamily, pipe, image: np.ndarray, mask: np.ndarray, length: int, steps: int) -> tuple[bytes, np.ndarray]:
    """Run the family's stock pipeline and composite outside the feathered mask; return PNG bytes and the raw output."""
    generated = adapter.stock_edit(
        pipe, Image.fromarray(image), mask_to_pil(mask), EDIT_PROMPT, seed=SEED, steps=steps,
        guidance_scale=FAMILY_GUIDANCE[adapter.name], max_sequence_length=length,
    )
    return encode_png(composite(image, generated, feather_alpha(mask, FEATHER_PX))), generated


def family_worker_request(
    adapter: ModelFamily, pipe, activations: TemplateActivations, image: np.ndarray, mask: np.ndarray, length: int,
    steps: int, stock_route: bool,
) -> tuple[bytes, np.ndarray]:
    """Run the worker's path (masked computation over the cache, or the stock route for large masks)."""
    if stock_route:
        return family_stock_request(adapter, pipe, image, mask, length, steps)
    output = adapter.masked_edit(
        pipe, activations, image, mask, EDIT_PROMPT, seed=SEED, steps=steps,
        guidance_scale=FAMILY_GUIDANCE[adapter.name], max_sequence_length=length, dilation=DILATION_TOKENS,
    )
    return encode_png(composite(image, output.generated, feather_alpha(mask, FEATHER_PX))), output.generated


# Guidance as each family's pipelines use it: Flux Fill's distilled guidance, classifier-free guidance elsewhere.
FAMILY_GUIDANCE = {"flux": GUIDANCE, "sd3": 7.0, "sdxl": 7.5, "sd2": 7.5}


def measure_family_row(
    adapter: ModelFamily, pipe, activations: TemplateActivations, image: np.ndarray, target_ratio: float,
    text_tokens: int, config: BenchConfig,
) -> Row:
    patch = adapter.pixels_per_token(pipe)
    mask = brush_mask(target_ratio, patch=patch)
    tokens = token_mask(mask, patch=patch, dilation=DILATION_TOKENS)
    length = family_sequence_length(adapter.name, text_tokens)
    fraction = adapter.flop_fraction(
        pipe, height=SIZE, width=SIZE, token_mask=tokens, text_tokens=text_tokens, variant=activations.metadata.variant
    )
    stock_route = fraction >= STOCK_ROUTE_FLOP_FRACTION
    baseline_times: list[tuple[float, float]] = []
    cached_times: list[tuple[float, float]] = []
    ratios: list[float] = []
    outputs: dict[str, np.ndarray] = {}

    def keep(name: str, call: Callable[[], tuple[bytes, np.ndarray]]) -> Callable[[], None]:
        return lambda: outputs.__setitem__(name, call()[1])

    run_baseline = keep("stock", lambda: family_stock_request(adapter, pipe, image, mask, length, config.steps))
    run_cached = keep(
        "cached",
        lambda: family_worker_request(adapter, pipe, activations, image, mask, length, config.steps, stock_route),
    )
    for repeat in range(config.repeats):
        if repeat % 2 == 0:
            baseline_time, cached_time = timed(run_baseline), timed(run_cached)
        else:
            cached_time, baseline_time = timed(run_cached), timed(run_baseline)
        baseline_times.append(baseline_time)
        cached_times.append(cached_time)
        ratios.append(baseline_time[0] / cached_time[0])

    rel_diff = 0.0
    if not stock_route:
        # Pixel space: the families' latent layouts differ, the decoded images do not.
        region = mask.astype(bool)
        stock = outputs["stock"].astype(np.float64)[region]
        cached = outputs["cached"].astype(np.float64)[region]
        rel_diff = float(np.linalg.norm(cached - stock) / max(np.linalg.norm(stock), 1e-12))
    row = Row(
        family=adapter.name,
        text_tokens=text_tokens,
        mask_ratio=round(float(tokens.mean()), 4),
        target_ratio=target_ratio,
        baseline_s=round(statistics.median(wall for wall, _ in baseline_times), 4),
        cached_s=round(statistics.median(wall for wall, _ in cached_times), 4),
        speedup=round(statistics.median(ratios), 3),
        baseline_cpu_s=round(statistics.median(cpu for _, cpu in baseline_times), 4),
        cached_cpu_s=round(statistics.median(cpu for _, cpu in cached_times), 4),
        flop_speedup_limit=round(1.0 if stock_route else 1.0 / fraction, 3),
        masked_rel_diff=round(rel_diff, 5),
        path="stock" if stock_route else "cached",
    )
    logger.info("%s", row)
    return row


def run_family(name: str, config: BenchConfig) -> tuple[list[Row], dict[str, object]]:
    """Benchmark a non-Flux family on its own demo model built at the config's preset."""
    adapter = get_family(name)
    folder = ensure_demo_model(
        REPO_ROOT / "var" / "models", config.preset, builder=adapter.build_demo, folder_name=f"{name}-{config.preset}"
    )
    pipe = adapter.load(folder, dtype=torch.float32, device=torch.device("cpu"))
    image = load_template()
    rows: list[Row] = []
    warmups: dict[str, float] = {}
    cache_mib = 0.0
    for text_tokens in FAMILY_TEXT_LENGTHS[name] if not config.quick else FAMILY_TEXT_LENGTHS[name][:1]:
        length = family_sequence_length(name, text_tokens)
        start = time.perf_counter()
        activations = adapter.warm_up(
            pipe, image, seed=SEED, steps=config.steps, guidance_scale=FAMILY_GUIDANCE[name],
            variant=adapter.variants[0], prompt=WARMUP_PROMPT, max_sequence_length=length,
        )
        warmups[str(text_tokens)] = round(time.perf_counter() - start, 3)
        cache_mib = round(activations.nbytes / 2**20, 1)
        first_mask = brush_mask(config.ratios[0], patch=adapter.pixels_per_token(pipe))
        family_stock_request(adapter, pipe, image, first_mask, length, config.steps)
        family_worker_request(adapter, pipe, activations, image, first_mask, length, config.steps, stock_route=False)
        for target_ratio in config.ratios:
            rows.append(measure_family_row(adapter, pipe, activations, image, target_ratio, text_tokens, config))
    return rows, {"warmup_s": warmups, "cache_mib": cache_mib, "pipeline": type(pipe).__name__}


def run(config: BenchConfig) -> tuple[list[Row], dict[str, object]]:
    model_dir = ensure_demo_model(REPO_ROOT / "var" / "models", config.flux_preset)
    pipe = FluxFillPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    # channels_last roughly halves the CPU time of the VAE convolutions; both paths share this VAE.
    pipe.vae.to(memory_format=torch.channels_last)
    image = load_template()
    rows: list[Row] = []
    warmups: dict[str, float] = {}
    packing: dict[str, float | None] = {}
    for text_tokens in config.text_lengths:
        start = time.perf_counter()
        activations = warm_up_template(
            pipe,
            image,
            seed=SEED,
            steps=config.steps,
            guidance_scale=GUIDANCE,
            prompt=WARMUP_PROMPT,
            max_sequence_length=text_tokens,
        )
        warmups[str(text_tokens)] = round(time.perf_counter() - start, 3)
        logger.info("Warm-up at %d text tokens: %.2f s, %.1f MiB", text_tokens, warmups[str(text_tokens)], activations.nbytes / 2**20)
        # One untimed request per path first, so one-time kernel and allocator setup is not timed.
        first_mask = brush_mask(config.ratios[0])
        stock_request(pipe, image, first_mask, text_tokens, config.steps)
        worker_request(pipe, activations, image, first_mask, text_tokens, config.steps, stock_route=False)
        outside = {
            "stock": flops_outside_transformer(lambda: stock_request(pipe, image, first_mask, text_tokens, config.steps)),
            "cached": flops_outside_transformer(
                lambda: worker_request(pipe, activations, image, first_mask, text_tokens, config.steps, stock_route=False)
            ),
        }
        logger.info("FLOPs outside the transformer: %s", {key: f"{value / 1e9:.1f} G" for key, value in outside.items()})
        for target_ratio in config.ratios:
            rows.append(measure_row(pipe, activations, image, target_ratio, text_tokens, config, outside))
        packing[str(text_tokens)] = packed_full_pass_speedup(pipe, text_tokens, config.steps)

    environment = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "flux_preset": config.flux_preset,
        "flux_transformer": (
            f"{pipe.transformer.config.num_layers} double-stream + {pipe.transformer.config.num_single_layers} "
            f"single-stream blocks, hidden size {pipe.transformer.inner_dim}"
        ),
        "steps": config.steps,
        "resolution": f"{SIZE}x{SIZE}",
        "repeats": config.repeats,
        "vae_memory_format": "channels_last (both paths)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average_at_end": os.getloadavg()[0],
        "warmup_s": warmups,
        "cache_mib": round(activations.nbytes / 2**20, 1),
        "packed_weights_full_pass_speedup": packing,
        "pipeline": type(pipe).__name__,
    }
    return rows, environment


FAMILY_TITLES = {
    "flux": "Flux Fill vs FluxFillPipeline",
    "sd3": "Stable Diffusion 3 vs StableDiffusion3InpaintPipeline",
    "sdxl": "SDXL inpainting vs StableDiffusionXLInpaintPipeline",
    "sd2": "Stable Diffusion 2 inpainting vs StableDiffusionInpaintPipeline",
}


def write_markdown(rows: list[Row], environment: dict[str, object], path: Path) -> None:
    lines = [
        "# Mask latency: cached masked edits vs each family's stock diffusers pipeline",
        "",
        "Generated by `python -m bench.mask_latency` (`--family NAME` reruns one family and keeps the other",
        "families' rows). One request is timed from the uint8 template and mask to the PNG bytes of the",
        "composited result, for both paths, on the same components, seed and resolution, in the same run.",
        "Times are medians of back-to-back repeats, and `speedup` is the median of per-repeat wall-clock ratios.",
        "CPU columns are the CPU seconds of the benchmark process, which other processes on the machine do not",
        "inflate as much as wall-clock time. `flop_speedup_limit` is denoiser FLOPs full / masked: transformer",
        "FLOPs for Flux and SD3, whole-UNet FLOPs (convolutions included) for SDXL and SD 2, whose convolutions,",
        "resnets and samplers run on every token, so they gain less. `masked_rel_diff` is the relative L2",
        "difference between the cached path and the full computation in the masked region, with a prompt other",
        "than the warm-up's: on final latents for Flux, on decoded pixels for the other families.",
        "Rows with `path = stock` were routed to the stock computation because the masked pass would need at",
        "least 90% of the full FLOPs. There both sides run the same stock code, so their deviation from 1.0 shows",
        "the measurement noise of the run (`load_average_at_end` is the 1-minute load average when it ended).",
        "`request_flop_limit` (Flux) is whole-request FLOPs stock / cached: the analytic transformer count plus",
        "the VAE and text encoder FLOPs of each side as torch.utils.flop_counter counts them (matrix products and",
        "convolutions). Both sides decode the full image and encode the masked image, and the stock pipeline also",
        "encodes the template, so this limit is below the denoiser one by the share of that fixed work.",
        "The Flux masked path runs its linear layers on weights packed for MKL's GEMM (on CPU in float32), packed",
        "once per worker process, so the untimed first request packs them. The stock side runs plain `F.linear`.",
        "`packed_weights_full_pass_speedup` is what the same packing gives a full all-token pass (one pass per",
        "step, plain time / packed time), the part of a Flux row's speedup that does not come from computing",
        "fewer tokens.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in environment.items()]
    for family in [name for name in FAMILY_CLASSES if any(row.family == name for row in rows)]:
        lines += [
            "",
            f"## {FAMILY_TITLES[family]}",
            "",
            "| text_tokens | mask_ratio | baseline_s | cached_s | speedup | flop_speedup_limit | speedup / limit "
            "| request_flop_limit | speedup / request limit "
            "| baseline_cpu_s | cached_cpu_s | cpu speedup | masked_rel_diff | path |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (row for row in rows if row.family == family):
            lines.append(
                f"| {row.text_tokens} | {row.mask_ratio:.3f} | {row.baseline_s:.3f} | {row.cached_s:.3f} | "
                f"{row.speedup:.2f} | {row.flop_speedup_limit:.2f} | {row.speedup / row.flop_speedup_limit:.0%} | "
                f"{request_limit_cells(row)} | "
                f"{row.baseline_cpu_s:.3f} | {row.cached_cpu_s:.3f} | {row.baseline_cpu_s / row.cached_cpu_s:.2f} | "
                f"{row.masked_rel_diff:.4f} | {row.path} |"
            )
    lines += ["", "## Targets (Flux Fill)", "", "| target | measured | met |", "|---|---|---|"]
    for description, measured, met in target_checks([row for row in rows if row.family == "flux"]):
        lines.append(f"| {description} | {measured} | {'yes' if met else 'no'} |")
    path.write_text("\n".join(lines) + "\n")


def request_limit_cells(row: Row) -> str:
    if row.request_flop_limit is None:
        return "- | -"
    return f"{row.request_flop_limit:.2f} | {row.speedup / row.request_flop_limit:.0%}"


def target_checks(rows: list[Row]) -> list[tuple[str, str, bool]]:
    """Return (target, measured value, met) for the product's latency targets."""
    checks: list[tuple[str, str, bool]] = []
    minimum_speedups = {0.11: 4.0, 0.19: 2.5, 1.0: 0.95}
    for row in rows:
        minimum = minimum_speedups.get(row.target_ratio)
        if row.text_tokens == 128 and minimum is not None:
            checks.append(
                (f"speedup >= {minimum:g}x at ratio {row.target_ratio:g}, 128 text tokens", f"{row.speedup:.2f}x", row.speedup >= minimum)
            )
    for row in rows:
        share = row.speedup / row.flop_speedup_limit
        checks.append(
            (
                f"speedup >= 75% of FLOP limit at ratio {row.target_ratio:g}, {row.text_tokens} text tokens",
                f"{share:.0%}",
                share >= 0.75,
            )
        )
    return checks


def write_plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [name for name in FAMILY_CLASSES if any(row.family == name for row in rows)]
    figure, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.5), squeeze=False)
    for axis, family in zip(axes[0], families):
        for text_tokens in sorted({row.text_tokens for row in rows if row.family == family}):
            selected = [row for row in rows if row.family == family and row.text_tokens == text_tokens]
            ratios = [row.mask_ratio for row in selected]
            (line,) = axis.plot(ratios, [row.speedup for row in selected], marker="o", label=f"measured, {text_tokens} text")
            axis.plot(
                ratios, [row.flop_speedup_limit for row in selected], linestyle="--", color=line.get_color(),
                label=f"FLOP limit, {text_tokens} text",
            )
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel("mask ratio (fraction of image tokens recomputed)")
        axis.set_ylabel("speedup over stock pipeline (x)")
        axis.set_title(family)
        axis.legend(fontsize=8)
    figure.suptitle("Cached masked edits: request speedup vs mask ratio")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 steps, 2 ratios; writes under var/bench/")
    parser.add_argument("--family", choices=[*FAMILY_CLASSES, "all"], default=None,
                        help="family to run (default: all, or flux with --quick)")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for mask_latency.{json,md,png}")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, quick 1)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Flux demo model preset (default 'bench-large': 12 blocks, hidden size 1024)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both paths (default 1, as each worker process of the "
                             "two-worker stack runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = full_config(args.quick)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be 1 or more.")
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be 1 or more.")
    torch.set_num_threads(args.threads)
    chosen = args.family or ("flux" if args.quick else "all")
    if args.preset is not None and chosen != "flux":
        parser.error(f"--preset {args.preset} sets the Flux model only; add --family flux.")
    config = dataclasses.replace(
        config,
        flux_preset=args.preset or config.flux_preset,
        repeats=args.repeats or config.repeats,
        out_dir=args.out_dir or config.out_dir,
    )
    families = list(FAMILY_CLASSES) if chosen == "all" else [chosen]
    config.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = config.out_dir / "mask_latency.json"
    environment_path = config.out_dir / "mask_latency.environment.json"
    # Rows of families not run now are kept, so families can be measured one at a time.
    kept = [Row(**row) for row in json.loads(json_path.read_text())] if json_path.is_file() else []
    environment = json.loads(environment_path.read_text()) if environment_path.is_file() else {}
    rows = [row for row in kept if row.family not in families]
    for family in families:
        family_rows, family_environment = run(config) if family == "flux" else run_family(family, config)
        rows += family_rows
        shared = {key: value for key, value in family_environment.items() if key not in ("warmup_s", "cache_mib", "pipeline")}
        environment.update(shared)
        environment[f"{family}_torch_threads"] = torch.get_num_threads()
        environment[f"{family}_warmup_s"] = family_environment["warmup_s"]
        environment[f"{family}_cache_mib"] = family_environment["cache_mib"]
    environment["load_average_at_end"] = os.getloadavg()[0]
    # Rows of other families may come from earlier commands; this names the run that wrote the files.
    environment["last_command"] = " ".join(["python -m bench.mask_latency", *sys.argv[1:]])
    order = list(FAMILY_CLASSES)
    rows.sort(key=lambda row: (order.index(row.family), row.text_tokens, row.target_ratio))
    json_path.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    environment_path.write_text(json.dumps(environment, indent=2) + "\n")
    write_markdown(rows, environment, config.out_dir / "mask_latency.md")
    write_plot(rows, config.out_dir / "mask_latency.png")
    logger.info("Wrote %s", json_path)


if __name__ == "__main__":
    main()
