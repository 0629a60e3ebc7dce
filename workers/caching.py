"""How a worker uses the activation cache for one job: warm-ups, lookups and the miss policy.

Decision per job, in order:

1. ``bypass``: the masked pass would compute nearly as many FLOPs as a full one (large masks), so the
   job runs in full and no cache is read or written.
2. ``hit``: the worker's store contains activations for the job's exact cache key; only masked tokens run.
3. On a miss, ``miss_warm_first`` when warming up now and then running masked is predicted to cost less
   than full computation for this job plus the jobs waiting for the same template and parameters;
   otherwise ``miss_full``: the job runs in full and a warm-up is queued for later jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cache.disk import CorruptEntryError
from cache.keys import CacheKey
from cache.loader import CacheLoadError
from cache.prefetch import Prefetcher
from editing.imaging import fit_working_size, token_mask
from editing.models import CacheOutcome
from workers.cache_streaming import StreamedCache, open_streamed, profile_tracker, record_denoise
from workers.masked.activations import TemplateActivations
from workers.masked.flops import TransformerShape
from workers.model_loading import LoadedModel
from workers.runner import RunnerSettings, StepCallback, WorkingInputs, prepare_working_inputs
from workers.template_cache import cache_key, get_store, load_activations, save_activations

logger = logging.getLogger(__name__)

# A masked pass that still computes at least this fraction of the full FLOPs cannot pay for its cache
# reads and bookkeeping, so such jobs run the stock computation.
BYPASS_FLOP_FRACTION = 0.9
# A warm-up is one full inference plus recording, so it costs about one full edit (an estimate from
# the demo model). Its cost is taken as this multiple of one full computation.
WARMUP_COST_RATIO = 1.0
WARMUP_PROMPT = ""


@dataclass(frozen=True)
class TokenCounts:
    image: int  # image tokens at the working size
    masked: int  # image tokens the masked pass recomputes
    text: int  # T5 tokens, padded to the maximum sequence length


@dataclass(frozen=True)
class CacheDecision:
    outcome: str  # a CacheOutcome value
    key: CacheKey | None
    activations: TemplateActivations | None
    flop_fraction: float  # transformer FLOPs of this job relative to a full computation
    queue_warmup: bool  # queue a warm-up for later jobs after this one
    # Set when the entry streams from disk: blocks arrive through the loader, and the plan computes
    # the first ``full_prefix_blocks`` blocks of each step in full while later loads run ahead.
    streamed: StreamedCache | None = None
    full_prefix_blocks: int = 0

    def close(self) -> None:
        if self.streamed is not None:
            self.streamed.close()


@dataclass(frozen=True)
class WarmupOutcome:
    key: CacheKey
    tier: str
    nbytes: int
    timings_ms: dict[str, float]
    activations: TemplateActivations


def working_template(model: LoadedModel, image: np.ndarray, settings: RunnerSettings) -> WorkingInputs:
    """Prepare the template alone (empty mask) at the working size that jobs on it use."""
    empty = np.zeros(image.shape[:2], dtype=bool)
    return prepare_working_inputs(image, empty, settings.max_work_pixels, model.working_multiple)


def job_cache_key(
    model: LoadedModel,
    inputs: WorkingInputs,
    *,
    template_hash: str,
    steps: int,
    seed: int,
    guidance: float,
    variant: str,
    settings: RunnerSettings,
) -> CacheKey:
    return cache_key(
        model,
        template_hash=template_hash,
        working_size=inputs.padded,
        steps=steps,
        seed=seed,
        guidance=guidance,
        variant=variant,
        warmup_prompt=WARMUP_PROMPT,
        max_sequence_length=settings.max_sequence_length,
    )


def job_token_mask(model: LoadedModel, inputs: WorkingInputs, settings: RunnerSettings) -> np.ndarray:
    """The job's finest-level token mask at the working size, dilated as the masked pass uses it."""
    return token_mask(np.asarray(inputs.mask) > 127, patch=model.token_pixels, dilation=settings.dilation_tokens)


def token_counts(model: LoadedModel, inputs: WorkingInputs, settings: RunnerSettings) -> TokenCounts:
    tokens = job_token_mask(model, inputs, settings)
    text = model.family.text_tokens(model.pipe, settings.max_sequence_length)
    return TokenCounts(image=int(tokens.size), masked=int(tokens.sum()), text=text)


def masked_flop_fraction(model: LoadedModel, inputs: WorkingInputs, *, variant: str, settings: RunnerSettings) -> float:
    """Denoiser FLOPs of the masked pass over those of a full pass, for the job's working-size mask."""
    tokens = job_token_mask(model, inputs, settings)
    width, height = inputs.padded
    return model.family.flop_fraction(
        model.pipe, height=height, width=width, token_mask=tokens,
        text_tokens=model.family.text_tokens(model.pipe, settings.max_sequence_length), variant=variant,
    )


def should_warm_first(pending_same_key: int, flop_fraction: float) -> bool:
    """Compare, in units of one full computation, warming now against running in full.

    Warm first: WARMUP_COST_RATIO + (n + 1) * f. Full now: n + 1 (the n waiting jobs would miss too
    until a later warm-up finishes). With n = 0 running in full always wins.
    """
    jobs = pending_same_key + 1
    return WARMUP_COST_RATIO + jobs * flop_fraction < jobs


def decide(
    model: LoadedModel,
    key: CacheKey,
    flop_fraction: float,
    *,
    pending_same_key: int,
    cache_valid: bool = True,
    counts: TokenCounts | None = None,
) -> CacheDecision:
    """Pick bypass, hit or a miss policy; ``cache_valid=False`` (an operator dropped it) discards the entry.

    With ``counts``, an entry on the disk tier is streamed block by block under a load plan instead
    of being read whole before the job starts.
    """
    if flop_fraction >= BYPASS_FLOP_FRACTION:
        return CacheDecision(CacheOutcome.BYPASS, None, None, 1.0, queue_warmup=False)
    store = get_store()
    if not cache_valid and store.drop(key):
        logger.info("cache entry %s was dropped by an operator; discarded", key.short())
    if cache_valid and counts is not None and model.family.streams_from_disk and store.tier_of(key) == "disk":
        streamed = open_disk_entry(model, key, counts)
        if streamed is not None and streamed.source is not None:
            return CacheDecision(
                CacheOutcome.HIT, key, streamed.activations, flop_fraction, queue_warmup=False,
                streamed=streamed, full_prefix_blocks=streamed.plan.full_prefix_blocks or 0,
            )
        if streamed is not None:
            # The plan predicts full recompute to beat loading this entry from disk.
            return CacheDecision(CacheOutcome.BYPASS, None, None, 1.0, queue_warmup=False)
    if cache_valid:
        activations = load_activations(key)
    else:
        activations = None
        store.record_miss()
    if activations is not None:
        return CacheDecision(CacheOutcome.HIT, key, activations, flop_fraction, queue_warmup=False)
    if should_warm_first(pending_same_key, flop_fraction):
        return CacheDecision(CacheOutcome.MISS_WARM_FIRST, key, None, flop_fraction, queue_warmup=False)
    return CacheDecision(CacheOutcome.MISS_FULL, key, None, 1.0, queue_warmup=True)


def open_disk_entry(model: LoadedModel, key: CacheKey, counts: TokenCounts) -> StreamedCache | None:
    """Open a disk entry for streaming; None (a miss) when it is gone or damaged."""
    try:
        return open_streamed(
            get_store(), key, tracker=profile_tracker(model, counts.text + counts.image), text_tokens=counts.text,
            masked_tokens=counts.masked, device=model.device,
        )
    except (CorruptEntryError, CacheLoadError, KeyError, ValueError):
        logger.warning("cache entry %s on disk is unreadable; treating it as a miss", key.short(), exc_info=True)
        return None


def warm_template(
    model: LoadedModel,
    template: WorkingInputs,
    key: CacheKey,
    *,
    settings: RunnerSettings,
    on_step: StepCallback | None = None,
    keep_alive: Callable[[], None] | None = None,
) -> WarmupOutcome:
    """Run the full warm-up inference on the template and store its activations under ``key``.

    `keep_alive` is called every few seconds while the warm-up waits for the model.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with model.hold(keep_alive):
        activations = model.family.warm_up(
            model.pipe,
            np.asarray(template.image),
            seed=key.seed,
            steps=key.steps,
            guidance_scale=key.guidance,
            variant=key.variant,
            prompt=WARMUP_PROMPT,
            max_sequence_length=settings.max_sequence_length,
            on_progress=on_step,
        )
    timings["warmup"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    tier, nbytes = save_activations(key, activations)
    timings["cache_store"] = (time.perf_counter() - start) * 1000
    logger.info(
        "warm-up %s stored in %s: %.1f MiB, %s",
        key.short(), tier, nbytes / 2**20, " ".join(f"{k}={v:.0f}ms" for k, v in timings.items()),
    )
    return WarmupOutcome(key=key, tier=tier, nbytes=nbytes, timings_ms=timings, activations=activations)


def record_timings(
    model: LoadedModel, decision: CacheDecision, counts: TokenCounts, *, steps: int, timings_ms: dict[str, float]
) -> None:
    """Correct the worker's cost model with this job's measured denoising and block-load times."""
    denoise_ms = timings_ms.get("denoise")
    # A warm-up inside the job or a mixed full/masked plan blurs the per-block figure; skip those.
    if not denoise_ms or decision.full_prefix_blocks or decision.outcome == CacheOutcome.MISS_WARM_FIRST:
        return
    if not model.family.streams_from_disk:
        return  # the block cost model drives disk streaming, which only such families use
    shape = TransformerShape.from_config(model.pipe.transformer.config)
    total = counts.text + counts.image
    tracker = profile_tracker(model, total)
    queries = counts.text + counts.masked if decision.outcome == CacheOutcome.HIT else total
    record_denoise(
        tracker, steps=steps, blocks=shape.num_blocks, query_tokens=queries, key_tokens=total,
        seconds=denoise_ms / 1000,
    )
    if decision.streamed is not None and decision.streamed.source is not None and decision.key is not None:
        block_bytes = (get_store().disk.entry_nbytes_of(decision.key) or 0) // max(1, steps * shape.num_blocks)
        for seconds in decision.streamed.source.loader.timings.load.values():
            tracker.record(load=(block_bytes, seconds))


def working_size(model: LoadedModel, width: int, height: int, settings: RunnerSettings) -> tuple[int, int]:
    """Return the padded (width, height) that ``prepare_working_inputs`` gives an image of this size."""
    multiple = model.working_multiple
    work_width, work_height = fit_working_size(width, height, settings.max_work_pixels, multiple)
    return -(-work_width // multiple) * multiple, -(-work_height // multiple) * multiple


def prefetch_keys(keys: list[CacheKey]) -> int:
    """Start promoting the disk-resident ones among ``keys`` into memory; return how many started."""
    store = get_store()
    started = 0
    for key in keys:
        if store.tier_of(key) == "disk":
            prefetcher().prefetch(key)
            started += 1
    return started


_prefetcher: Prefetcher | None = None


def prefetcher() -> Prefetcher:
    global _prefetcher
    if _prefetcher is None or _prefetcher.store is not get_store():
        _prefetcher = Prefetcher(get_store())
    return _prefetcher
