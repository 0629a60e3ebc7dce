"""Streaming a disk-resident cache entry into the masked engine while it computes.

An entry in host memory is used as it is. An entry on the disk tier is read block by block by a
``cache.loader.BlockLoader`` thread in the order the engine consumes it, and ``cache.plan`` decides
how many leading blocks of each step to compute in full so that the loads run ahead of compute
instead of stalling it. The cost model is profiled on the worker on first use (one block at a few
token counts, reads of a few sizes) and then corrected after every job.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.compression import decode
from cache.entry import block_prefix
from cache.keys import CacheKey
from cache.loader import BlockLoader, BlockTensors, DiskBlockSource
from cache.plan import BlockProfile, ComputeModel, LoadModel, LoadPlan, ProfileTracker, plan_masked, profile_blocks
from cache.store import ActivationStore
from workers.masked.activations import ActivationsMetadata, BlockActivations, TemplateActivations
from workers.masked.flops import TransformerShape
from workers.model_loading import LoadedModel

logger = logging.getLogger(__name__)

# Starting points of the cost model until the worker has measured itself. Both are estimates: a
# 2-core CPU reaches tens of GFLOP/s in fp32, a data-centre GPU hundreds of TFLOP/s in bf16, and a
# local SSD several hundred MB/s.
ASSUMED_FLOPS_PER_S = {"cpu": 5e10, "cuda": 2e14}
ASSUMED_DISK_BYTES_PER_S = 5e8
ASSUMED_LOAD_LATENCY_S = 1e-3
LOADER_DEPTH = 4

_tracker: ProfileTracker | None = None
_tracker_lock = threading.Lock()


def to_block_activations(block: BlockTensors) -> BlockActivations:
    prefix = block_prefix(block.step, block.block)
    return BlockActivations(**{name.removeprefix(prefix): tensor for name, tensor in block.tensors.items()})


class LoaderEngineSource:
    """The masked engine's ``BlockCacheSource`` over a ``BlockLoader``."""

    def __init__(self, loader: BlockLoader) -> None:
        self.loader = loader

    def get(self, step: int, block: int) -> BlockActivations:
        return to_block_activations(self.loader.get(step, block))


@dataclass
class StreamedCache:
    """A disk entry opened for streaming: latents and metadata now, blocks through ``source``."""

    activations: TemplateActivations  # latents trajectory and metadata; no blocks
    source: LoaderEngineSource | None  # None when the plan chose full recompute
    plan: LoadPlan

    def close(self) -> None:
        if self.source is not None:
            self.source.loader.close()


def flop_compute_model(shape: TransformerShape, device_type: str) -> ComputeModel:
    """Seconds per block as c1 * q + c2 * q * kv, from the block's FLOPs at an assumed rate.

    Double and single Flux blocks both cost 8 d^2 + 4 d f FLOPs per query token outside attention
    (d = hidden size, f = MLP size) and 4 d per query-key pair in attention.
    """
    rate = ASSUMED_FLOPS_PER_S.get(device_type, ASSUMED_FLOPS_PER_S["cpu"])
    d, f = shape.hidden, shape.mlp_hidden
    return ComputeModel(c0=0.0, c1=(8 * d * d + 4 * d * f) / rate, c2=4 * d / rate)


def estimated_profile(shape: TransformerShape, device_type: str) -> BlockProfile:
    return BlockProfile(
        flop_compute_model(shape, device_type),
        LoadModel(latency_s=ASSUMED_LOAD_LATENCY_S, bandwidth_bytes_per_s=ASSUMED_DISK_BYTES_PER_S),
    )


def measured_profile(model: LoadedModel, total_tokens: int, scratch_dir: Path) -> BlockProfile:
    """Time one transformer block at a few token counts and file reads at a few sizes, and fit both.

    NOTE: the read timing goes through the page cache right after the write, so it measures the read
    and copy path rather than the disk; live block-load timings correct the load model afterwards.
    """
    transformer = model.pipe.transformer
    blocks = transformer.single_transformer_blocks or transformer.transformer_blocks
    block = blocks[0]
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    device, dtype = model.device, model.dtype
    temb = torch.zeros(1, hidden, device=device, dtype=dtype)
    empty_text = torch.zeros(1, 0, hidden, device=device, dtype=dtype)

    def compute_block(tokens: int) -> None:
        states = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
        with torch.inference_mode():
            block(hidden_states=states, encoder_hidden_states=empty_text, temb=temb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    scratch_dir.mkdir(parents=True, exist_ok=True)
    # A file of its own: worker processes on one machine share the cache folder and profile at the same time.
    descriptor, name = tempfile.mkstemp(prefix="profile-read-", suffix=".bin", dir=scratch_dir)
    scratch = Path(name)
    sizes = [1 << 20, 8 << 20]

    def load_bytes(nbytes: int) -> None:
        with open(scratch, "rb") as handle:
            torch.frombuffer(bytearray(handle.read(nbytes)), dtype=torch.uint8).to(device)

    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(os.urandom(max(sizes)))
        counts = sorted({max(16, total_tokens // 4), max(32, total_tokens // 2), total_tokens})
        with model.lock:
            return profile_blocks(compute_block, counts, load_bytes, sizes, repeats=2)
    finally:
        scratch.unlink(missing_ok=True)


def profile_tracker(model: LoadedModel, total_tokens: int) -> ProfileTracker:
    """Return this process's cost model, profiled on first use and corrected by live timings after.

    A failed profile falls back to FLOP counts at an assumed rate, which live timings then correct.
    """
    global _tracker
    with _tracker_lock:
        if _tracker is None:
            shape = TransformerShape.from_config(model.pipe.transformer.config)
            try:
                profile = measured_profile(model, total_tokens, get_store_directory())
            except (RuntimeError, OSError, ValueError):
                logger.warning("block profiling failed; starting from FLOP estimates", exc_info=True)
                profile = estimated_profile(shape, model.device.type)
            _tracker = ProfileTracker(profile)
        return _tracker


def get_store_directory() -> Path:
    from cache.config import CacheSettings

    return Path(CacheSettings.from_env().directory)


def reset_profile() -> None:
    global _tracker
    with _tracker_lock:
        _tracker = None


def record_denoise(tracker: ProfileTracker, *, steps: int, blocks: int, query_tokens: int, key_tokens: int,
                   seconds: float) -> None:
    """Fold one request's denoising time, spread evenly over its blocks, into the cost model."""
    if steps > 0 and blocks > 0 and seconds > 0:
        tracker.record(compute=(query_tokens, key_tokens, seconds / (steps * blocks)))


def open_streamed(
    store: ActivationStore,
    key: CacheKey,
    *,
    tracker: ProfileTracker,
    text_tokens: int,
    masked_tokens: int,
    device: torch.device,
) -> StreamedCache | None:
    """Open ``key``'s disk entry, plan the request and start loading; None when it is not on disk."""
    if store.disk is None:
        return None
    reader = store.disk.open_reader(key)
    if reader is None:
        return None
    source = DiskBlockSource(store.disk, key, reader)
    try:
        metadata = ActivationsMetadata.from_strings(dict(reader.meta.extra))
        latents = decode(source.read(["latents"]), source.codec, source.dtype)["latents"]
    except Exception:
        source.close()
        raise
    # Every step and block stores tensors of the same shape; the latents are small beside them.
    entry_bytes = store.disk.entry_nbytes_of(key) or 0
    block_bytes = max(1, entry_bytes // (metadata.num_steps * metadata.num_blocks))
    image_tokens = metadata.num_image_tokens
    plan = plan_masked(
        tracker.profile,
        steps=metadata.num_steps,
        blocks=metadata.num_blocks,
        total_tokens=text_tokens + image_tokens,
        masked_tokens=text_tokens + masked_tokens,
        block_bytes=block_bytes,
        depth=LOADER_DEPTH,
        metrics=store.metrics,
    )
    trajectory = TemplateActivations(metadata=metadata, latents=latents, blocks=[])
    logger.info("cache %s on disk: %s", key.short(), plan.reason)
    if not plan.use_cache:
        source.close()
        return StreamedCache(trajectory, None, plan)
    loader = BlockLoader(
        source, plan.load_order(metadata.num_steps, metadata.num_blocks), device=device, depth=LOADER_DEPTH,
        metrics=store.metrics,
    )
    return StreamedCache(trajectory, LoaderEngineSource(loader), plan)
