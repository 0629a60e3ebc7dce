"""Latency of a masked edit whose cache sits on disk: load-then-compute vs overlapped vs full recompute.

Run `python -m bench.cache_overlap` (writes docs/benchmarks/cache_overlap.{json,md,png}) or add
`--quick` for a small run written to var/benchmarks/.

It drives the real masked Flux Fill engine (`workers.masked`) through `BlockCacheSource`. The
model is a small Flux Fill transformer with seeded random weights: 2 double and 6 single blocks,
8 heads x 64 = 512 channels. It runs at 384 x 384 pixels (576 image tokens), 4 steps, on the CPU.

Every cached block is read from a safetensors file on disk, verified (sha256) and decoded on the
loader thread. Disk reads from the page cache are much faster than this CPU computes, so each
read is padded with sleep to an emulated bandwidth chosen so that loading one block takes half
the measured time of computing one full block (`LOAD_TO_FULL_COMPUTE`). Sleep leaves the CPU to
the compute, like a DMA copy or a disk read would. A second table measures the storage codecs:
bytes, K/V error and the difference of the engine's final latents against an fp32 cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image

from cache.compression import CODECS, DEFAULT_CODEC, Codec, decode, encode, encoded_nbytes_of, fp8_supported
from cache.disk import DiskTier
from cache.entry import block_prefix
from cache.loader import BlockLoader, DiskBlockSource, open_block_source
from cache.plan import BlockProfile, LoadPlan, fit_compute_model, fit_load_model, plan_masked
from cache.policies import LruPolicy
from cache.store import ActivationStore
from cache.testing import make_key
from workers.cache_streaming import LoaderEngineSource, to_block_activations
from workers.masked.activations import BlockActivations, TemplateActivations
from workers.masked.conditioning import PromptEmbedding, embedding_from_tensors
from workers.masked.inference import MaskedDenoiseInputs, denoise_masked, prepare_masked_inputs
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import warm_up_template

logger = logging.getLogger(__name__)

LOAD_TO_FULL_COMPUTE = 0.5  # emulated load time of one block / measured compute time of one full block
SEED = 3
GUIDANCE = 30.0
TEXT_TOKENS = 16
LOADER_DEPTH_STEPS = 1  # the loader may run one step of blocks ahead of compute
PROFILE_REPEATS = 6


@dataclass(frozen=True)
class BenchConfig:
    size: int  # pixels per side
    steps: int
    ratios: tuple[float, ...]
    compression_ratio: float
    repeats: int  # timings per mode and ratio; the table reports the minimum


FULL = BenchConfig(size=384, steps=4, ratios=(0.1, 0.25, 0.5, 0.75, 1.0), compression_ratio=0.25, repeats=5)
QUICK = BenchConfig(size=256, steps=2, ratios=(0.25, 1.0), compression_ratio=0.25, repeats=1)


@dataclass(frozen=True)
class OverlapRow:
    mask_ratio: float
    sequential_s: float
    overlapped_s: float
    full_recompute_s: float
    sequential_runs_s: tuple[float, ...]
    overlapped_runs_s: tuple[float, ...]
    full_recompute_runs_s: tuple[float, ...]
    full_prefix_blocks: int | None
    predicted_overlapped_s: float
    predicted_sequential_s: float
    plan_reason: str


@dataclass(frozen=True)
class CodecRow:
    codec: str
    bytes_per_block: int
    bytes_saved_fraction: float
    kv_relative_error: float
    latents_relative_difference: float


# Model and inputs -----------------------------------------------------------------------------


def build_pipeline() -> FluxFillPipeline:
    """Build the benchmark's Flux Fill pipeline with seeded random weights and no text encoders."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=2, num_single_layers=6,
        attention_head_dim=64, num_attention_heads=8, joint_attention_dim=128, pooled_projection_dim=64,
        guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # N(0, 1/fan_in) weights: the default init keeps attention outputs near zero, so a wrong
        # or lossy cache would barely change the latents.
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.weight.shape[1] ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True
    )
    return FluxFillPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )


def template_image(size: int) -> Image.Image:
    ramp = numpy.linspace(0, 255, size)
    noise = numpy.random.default_rng(0).normal(0, 20, size=(size, size, 3))
    base = numpy.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), numpy.full((size, size), 96.0)], -1)
    return Image.fromarray(numpy.clip(base + noise, 0, 255).astype(numpy.uint8), mode="RGB")


def random_embedding(pipe: FluxFillPipeline) -> PromptEmbedding:
    generator = torch.Generator().manual_seed(11)
    return embedding_from_tensors(
        pipe, torch.randn(1, TEXT_TOKENS, 128, generator=generator), torch.randn(1, 64, generator=generator)
    )


def token_mask(grid: tuple[int, int], ratio: float) -> numpy.ndarray:
    """Mask the first round(ratio * tokens) tokens in row-major order (a band from the top)."""
    mask = numpy.zeros(grid[0] * grid[1], dtype=bool)
    mask[: max(1, round(ratio * mask.size))] = True
    return mask.reshape(grid)


def masked_inputs(
    pipe: FluxFillPipeline, embedding: PromptEmbedding, config: BenchConfig, grid: tuple[int, int], ratio: float
) -> MaskedDenoiseInputs:
    tokens = token_mask(grid, ratio)
    pixels = numpy.kron(tokens.astype(numpy.uint8), numpy.ones((16, 16), dtype=numpy.uint8)) * 255
    image = template_image(config.size)
    return prepare_masked_inputs(
        pipe, image, Image.fromarray(pixels, mode="L"), embedding, TokenLayout.from_token_mask(tokens),
        seed=SEED, steps=config.steps, guidance_scale=GUIDANCE,
    )


# Block sources --------------------------------------------------------------------------------


class ThrottledSource:
    """A disk block source whose reads last at least bytes / `bandwidth_bytes_per_s` (padded by sleep)."""

    def __init__(self, inner: DiskBlockSource, bandwidth_bytes_per_s: float) -> None:
        self.inner = inner
        self.codec = inner.codec
        self.dtype = inner.dtype
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s

    def block_names(self, step: int, block: int) -> list[str]:
        return self.inner.block_names(step, block)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        tensors = self.inner.read(names)
        target = sum(tensor.nbytes for tensor in tensors.values()) / self.bandwidth_bytes_per_s
        time.sleep(max(0.0, target - (time.perf_counter() - started)))
        return tensors

    def close(self) -> None:
        self.inner.close()


class DictEngineSource:
    """The engine's BlockCacheSource over blocks already loaded into a dict."""

    def __init__(self, blocks: dict[tuple[int, int], BlockActivations]) -> None:
        self.blocks = blocks

    def get(self, step: int, block: int) -> BlockActivations:
        return self.blocks[(step, block)]


# Measurements ---------------------------------------------------------------------------------


@dataclass
class Setup:
    pipe: FluxFillPipeline
    embedding: PromptEmbedding
    config: BenchConfig
    activations: TemplateActivations
    trajectory_only: TemplateActivations
    store: ActivationStore
    steps: int
    blocks: int
    tokens: int
    block_bytes: int


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def prepare(config: BenchConfig, directory: Path) -> Setup:
    pipe = build_pipeline()
    embedding = random_embedding(pipe)
    logger.info("warming up a %dx%d template for %d steps", config.size, config.size, config.steps)
    activations = warm_up_template(
        pipe, template_image(config.size), seed=SEED, steps=config.steps, guidance_scale=GUIDANCE,
        variant="kv", prompt=embedding,
    )
    metadata = activations.metadata
    # The masked path reads only latents and metadata from here; blocks come from the source.
    trajectory_only = TemplateActivations(metadata=metadata, latents=activations.latents, blocks=[])
    # A zero memory budget sends the entry to the disk tier, where this benchmark wants it.
    store = ActivationStore(0, LruPolicy(), disk=DiskTier(directory, 1 << 34), codec=DEFAULT_CODEC)
    tensors = activations.to_tensors()
    store.put_tensors(make_key(0), tensors, steps=metadata.num_steps, blocks=metadata.num_blocks)
    first_block = {name: tensor for name, tensor in tensors.items() if name.startswith(block_prefix(0, 0))}
    return Setup(
        pipe, embedding, config, activations, trajectory_only, store, metadata.num_steps, metadata.num_blocks,
        metadata.num_image_tokens, encoded_nbytes_of(first_block, DEFAULT_CODEC),
    )


def run_full(setup: Setup, inputs: MaskedDenoiseInputs) -> float:
    seconds, _ = timed(
        lambda: denoise_masked(setup.pipe, setup.trajectory_only, inputs, full_prefix_blocks=setup.blocks)
    )
    return seconds


def run_in_memory(setup: Setup, inputs: MaskedDenoiseInputs, activations: TemplateActivations) -> tuple[float, torch.Tensor]:
    seconds, latents = timed(lambda: denoise_masked(setup.pipe, activations, inputs, full_prefix_blocks=0))
    return seconds, latents  # type: ignore[return-value]


def throttled_source(setup: Setup, bandwidth: float) -> ThrottledSource:
    source = open_block_source(setup.store, make_key(0))
    if not isinstance(source, DiskBlockSource):
        raise RuntimeError("the benchmark entry is not on disk; check the disk tier directory")
    return ThrottledSource(source, bandwidth)


def run_sequential(setup: Setup, inputs: MaskedDenoiseInputs, bandwidth: float) -> float:
    order = [(step, block) for step in range(setup.steps) for block in range(setup.blocks)]

    def load_then_compute() -> None:
        with BlockLoader(throttled_source(setup, bandwidth), order, depth=len(order)) as loader:
            blocks = {block_id: to_block_activations(loader.get(*block_id)) for block_id in order}
        denoise_masked(setup.pipe, setup.trajectory_only, inputs, full_prefix_blocks=0,
                       block_source=DictEngineSource(blocks))

    seconds, _ = timed(load_then_compute)
    return seconds


def run_overlapped(setup: Setup, inputs: MaskedDenoiseInputs, plan: LoadPlan, bandwidth: float) -> float:
    if not plan.use_cache or plan.full_prefix_blocks is None:
        raise ValueError("run_overlapped needs a plan that uses the cache; time the full recompute instead.")
    order = plan.load_order(setup.steps, setup.blocks)
    prefix = plan.full_prefix_blocks

    def overlapped() -> None:
        depth = LOADER_DEPTH_STEPS * setup.blocks
        with BlockLoader(throttled_source(setup, bandwidth), order, depth=depth) as loader:
            denoise_masked(setup.pipe, setup.trajectory_only, inputs, full_prefix_blocks=prefix,
                           block_source=LoaderEngineSource(loader))

    seconds, _ = timed(overlapped)
    return seconds


def measure_profile(setup: Setup, grid: tuple[int, int], decoded: TemplateActivations) -> tuple[BlockProfile, float]:
    """Fit the plan's cost model from whole-request timings; returns it and the emulated bandwidth."""
    per_request_blocks = setup.steps * setup.blocks
    full_inputs = masked_inputs(setup.pipe, setup.embedding, setup.config, grid, 1.0)
    run_full(setup, full_inputs)  # untimed: first-call allocations
    # Minimum of PROFILE_REPEATS, like the reported timings: the least disturbed run on a shared CPU.
    full_block_s = min(run_full(setup, full_inputs) for _ in range(PROFILE_REPEATS)) / per_request_blocks
    queries, seconds = [setup.tokens], [full_block_s]
    for ratio in (0.25, 0.75):
        inputs = masked_inputs(setup.pipe, setup.embedding, setup.config, grid, ratio)
        queries.append(inputs.layout.num_masked)
        timings = [run_in_memory(setup, inputs, decoded)[0] for _ in range(PROFILE_REPEATS)]
        seconds.append(min(timings) / per_request_blocks)
    compute = fit_compute_model(queries, seconds, key_tokens=setup.tokens)

    bandwidth = setup.block_bytes / (LOAD_TO_FULL_COMPUTE * full_block_s)
    sizes, load_seconds = [], []
    for count in (1, 4):
        source = throttled_source(setup, bandwidth)
        names = [name for block in range(count) for name in source.block_names(0, block)]
        elapsed, tensors = timed(lambda names=names: decode(source.read(names), source.codec, source.dtype))
        source.close()
        sizes.append(count * setup.block_bytes)
        load_seconds.append(elapsed)
    profile = BlockProfile(compute, fit_load_model(sizes, load_seconds))
    logger.info("full block %.4f s, profile %s, emulated bandwidth %.1f MB/s", full_block_s, profile, bandwidth / 1e6)
    return profile, bandwidth


def measure_codecs(setup: Setup, grid: tuple[int, int]) -> list[CodecRow]:
    """Compare codecs on the engine's K/V: bytes, tensor error, and final-latent difference vs fp32."""
    tensors = setup.activations.to_tensors()
    kv = {name: tensor for name, tensor in tensors.items() if name != "latents"}
    inputs = masked_inputs(setup.pipe, setup.embedding, setup.config, grid, setup.config.compression_ratio)
    masked = inputs.layout.masked
    fp32_bytes = encoded_nbytes_of(kv, "fp32")
    reference: torch.Tensor | None = None
    rows = []
    for codec in [c for c in CODECS if c != "fp8" or fp8_supported()]:
        decoded = decode(encode(kv, codec), codec, torch.float32)  # type: ignore[arg-type]
        errors = [float(torch.linalg.vector_norm(decoded[n] - kv[n]) / torch.linalg.vector_norm(kv[n])) for n in kv]
        decoded["latents"] = tensors["latents"]
        activations = TemplateActivations.from_tensors(decoded, setup.activations.metadata)
        _, latents = run_in_memory(setup, inputs, activations)
        if reference is None:
            reference = latents
        difference = float(
            torch.linalg.vector_norm(latents[masked] - reference[masked]) / torch.linalg.vector_norm(reference[masked])
        )
        codec_bytes = encoded_nbytes_of(kv, codec)  # type: ignore[arg-type]
        rows.append(CodecRow(codec, codec_bytes // (setup.steps * setup.blocks), 1 - codec_bytes / fp32_bytes,
                             statistics.mean(errors), difference))
        logger.info("codec %s: %s", codec, rows[-1])
    return rows


def run(config: BenchConfig, directory: Path) -> tuple[list[OverlapRow], list[CodecRow], dict[str, object]]:
    setup = prepare(config, directory)
    grid = setup.activations.metadata.grid
    codec_rows = measure_codecs(setup, grid)
    decoded = TemplateActivations.from_tensors(
        {**decode(encode(setup.activations.to_tensors(), DEFAULT_CODEC), DEFAULT_CODEC, torch.float32)},
        setup.activations.metadata,
    )
    profile, bandwidth = measure_profile(setup, grid, decoded)
    rows = []
    for ratio in config.ratios:
        inputs = masked_inputs(setup.pipe, setup.embedding, config, grid, ratio)
        plan_s, plan = timed(
            lambda: plan_masked(
                profile, steps=setup.steps, blocks=setup.blocks, total_tokens=setup.tokens,
                masked_tokens=inputs.layout.num_masked, block_bytes=setup.block_bytes,
                depth=LOADER_DEPTH_STEPS * setup.blocks,
            )
        )
        timings: dict[str, list[float]] = {"full": [], "sequential": [], "overlapped": []}
        # Modes alternate within each repeat, so a slow spell of a shared CPU hits all of them.
        for _ in range(config.repeats):
            timings["full"].append(run_full(setup, inputs))
            timings["sequential"].append(run_sequential(setup, inputs, bandwidth))
            if plan.use_cache:
                timings["overlapped"].append(run_overlapped(setup, inputs, plan, bandwidth))
            else:
                # Without cache the overlapped path is the full recompute itself, plus planning.
                timings["overlapped"].append(timings["full"][-1] + plan_s)
        rows.append(
            OverlapRow(
                mask_ratio=ratio,
                sequential_s=min(timings["sequential"]),
                overlapped_s=min(timings["overlapped"]),
                full_recompute_s=min(timings["full"]),
                sequential_runs_s=tuple(timings["sequential"]),
                overlapped_runs_s=tuple(timings["overlapped"]),
                full_recompute_runs_s=tuple(timings["full"]),
                full_prefix_blocks=plan.full_prefix_blocks,
                predicted_overlapped_s=plan.predicted_s,
                predicted_sequential_s=plan.predicted_sequential_s,
                plan_reason=plan.reason,
            )
        )
        logger.info("mask ratio %.2f: %s", ratio, rows[-1])
    context = {
        "pixels": config.size, "steps": setup.steps, "blocks": setup.blocks, "image_tokens": setup.tokens,
        "codec": DEFAULT_CODEC, "block_bytes": setup.block_bytes, "emulated_bandwidth_bytes_per_s": bandwidth,
        "load_to_full_compute": LOAD_TO_FULL_COMPUTE, "torch_threads": torch.get_num_threads(),
        "repeats": config.repeats,
        "profile": {"compute": asdict(profile.compute), "load": asdict(profile.load)},
    }
    return rows, codec_rows, context


# Output -------------------------------------------------------------------------------------


def write_markdown(rows: list[OverlapRow], codec_rows: list[CodecRow], context: dict[str, object], path: Path) -> None:
    lines = [
        "# Cache loading: sequential vs overlapped vs full recompute",
        "",
        f"Generated by `python -m bench.cache_overlap` on {context['torch_threads']} CPU threads: real masked Flux",
        f"Fill engine, random-weight transformer with {context['blocks']} blocks, {context['pixels']} x "
        f"{context['pixels']} pixels ({context['image_tokens']} image tokens), {context['steps']} steps, cache codec",
        f"`{context['codec']}` ({context['block_bytes']} bytes per block) read from disk with sha256 checks, and",
        f"reads padded to {float(context['emulated_bandwidth_bytes_per_s']) / 1e6:.1f} MB/s so one block load takes "
        f"{context['load_to_full_compute']} x one full block compute. Times are the minimum of {context['repeats']} runs "
        "(other processes shared the CPUs; every run is in the JSON).",
        "",
        f"1-minute load average of the machine: {_load_text(context)}.",
        "",
        "| mask ratio | sequential (s) | overlapped (s) | full recompute (s) | overlapped faster than sequential: "
        "minimums, median of paired runs | k |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = 1 - row.overlapped_s / row.sequential_s
        # Runs of one repeat ran back to back, so their ratio cancels most of the shared-CPU noise.
        paired = statistics.median(
            1 - overlapped / sequential
            for overlapped, sequential in zip(row.overlapped_runs_s, row.sequential_runs_s, strict=True)
        )
        k = "no cache" if row.full_prefix_blocks is None else str(row.full_prefix_blocks)
        lines.append(
            f"| {row.mask_ratio:.2f} | {row.sequential_s:.2f} | {row.overlapped_s:.2f} | {row.full_recompute_s:.2f} "
            f"| {gain:.0%}, {paired:.0%} | {k} |"
        )
    lines += [
        "",
        "k is the plan's number of full blocks per step; \"no cache\" means the plan chose full recompute.",
        "",
        "## Storage codecs",
        "",
        "Engine K/V of the same warm-up; latents difference = relative L2 of the masked tokens' final latents",
        "against an fp32 cache, mask ratio 0.25.",
        "",
        "| codec | bytes per block | bytes saved | K/V relative error | final latents difference |",
        "|---|---|---|---|---|",
    ]
    for row in codec_rows:
        lines.append(
            f"| {row.codec} | {row.bytes_per_block} | {row.bytes_saved_fraction:.0%} | {row.kv_relative_error:.2e} "
            f"| {row.latents_relative_difference:.2e} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _load_text(context: dict[str, object]) -> str:
    load = context.get("load_average_1min")
    if not isinstance(load, dict):
        return "not recorded"
    return f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, on {os.cpu_count()} CPUs"


def write_plot(rows: list[OverlapRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    ratios = [row.mask_ratio for row in rows]
    axis.plot(ratios, [row.sequential_s for row in rows], marker="o", label="load, then compute")
    axis.plot(ratios, [row.overlapped_s for row in rows], marker="o", label="overlapped (plan)")
    axis.plot(ratios, [row.full_recompute_s for row in rows], marker="o", label="full recompute")
    axis.set_xlabel("mask ratio")
    axis.set_ylabel("request latency (s)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render_from_json(output: Path) -> None:
    report = json.loads((output / "cache_overlap.json").read_text())
    rows = [OverlapRow(**{**row, **{name: tuple(row[name]) for name in row if name.endswith("_runs_s")}})
            for row in report.pop("rows")]
    codec_rows = [CodecRow(**row) for row in report.pop("codecs")]
    write_markdown(rows, codec_rows, report, output / "cache_overlap.md")
    write_plot(rows, output / "cache_overlap.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256 pixels, 2 steps, 2 mask ratios; writes to var/")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the Markdown table and plot from the existing JSON"
    )
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = QUICK if arguments.quick else FULL
    output = Path("var/benchmarks") if arguments.quick else Path("docs/benchmarks")
    output.mkdir(parents=True, exist_ok=True)
    Path("var").mkdir(exist_ok=True)
    if arguments.render_only:
        render_from_json(output)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cache-overlap-", dir="var") as directory:
        rows, codec_rows, context = run(config, Path(directory))
    # The 1-minute load average shows how much other work shared the CPUs during the run.
    context["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    report = {**context, "rows": [asdict(row) for row in rows], "codecs": [asdict(row) for row in codec_rows]}
    (output / "cache_overlap.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(rows, codec_rows, context, output / "cache_overlap.md")
    write_plot(rows, output / "cache_overlap.png")
    logger.info("wrote %s", output / "cache_overlap.md")


if __name__ == "__main__":
    main()
