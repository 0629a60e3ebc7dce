"""Masked inpainting for the UNet families SDXL and SD 2, over the stock diffusers inpainting pipelines.

Only the transformer blocks inside the UNet (`BasicTransformerBlock` in each `Transformer2DModel`) are masked.
Convolutions, resnets, down/up sampling and each Transformer2DModel's GroupNorm, proj_in and proj_out run on
every token, because their outputs at unmasked positions are not cached. At each UNet resolution the masked
tokens are the latent-grid mask max-pooled once per downsampling. Inside a masked Transformer2DModel only
masked tokens enter its blocks: their self-attention reads fresh K/V of masked tokens and cached K/V of the
others, and the group's output at unmasked tokens is the cached output of its last block.

Everything runs through the stock pipeline `__call__`: attention processors (`set_attn_processor`) and module
hooks record or reuse activations, and `callback_on_step_end` keeps unmasked latents on the cached trajectory.

Cached tensors per step and block (both halves of the classifier-free guidance batch): `k` and `v` of the
self-attention, (batch, heads, tokens, head_dim), and for the last block of each Transformer2DModel `hidden`,
the block output (batch, tokens, channels), the only output a masked run reads.
Latents keep the UNet layout: `TemplateActivations.latents` has shape (steps + 1, 4, height / 8, width / 8).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from editing.imaging import token_mask as pixel_to_token_mask
from workers.demo_model import CLIP_MAX_LENGTH, build_clip_tokenizer, reinit_transformer
from workers.families.base import DEMO_PRESETS, MaskedOutput, ModelFamily, StepCallback
from workers.masked.activations import (
    ActivationsMetadata,
    BlockActivations,
    BlockCacheSource,
    InMemoryBlockCacheSource,
    TemplateActivations,
)
from workers.masked.edit import mask_to_pil
from workers.masked.processors import StepCursor
from workers.masked.warmup import to_pil_image

logger = logging.getLogger(__name__)

UNET_IN_CHANNELS = 9  # 4 noisy latents + 1 mask + 4 masked-image latents, as in real inpainting checkpoints
LATENT_CHANNELS = 4

# VAE scaling factors: the Stable Diffusion default (diffusers' convert_from_ckpt) and stabilityai/sdxl-vae's config.
SD2_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
# Scheduler settings diffusers' convert_from_ckpt gives SDXL checkpoints. The SD 2 betas are assumed to be the same.
_SCHEDULER_BASE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


# ---------------------------------------------------------------------------------------------------------
# Demo pipelines


@dataclass(frozen=True)
class UNetPreset:
    """Sizes of one demo UNet pipeline.

    `attention_levels[i]` is True where resolution level i has cross-attention blocks. `transformer_layers[i]`
    is the number of transformer blocks per Transformer2DModel there, and the mid block uses the last entry.
    """

    block_out_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    transformer_layers: tuple[int, ...]
    layers_per_block: int
    head_dim: int
    norm_num_groups: int
    text_hidden: int
    vae_channels: tuple[int, int, int, int]


# SD 2 inpainting has cross-attention at every level but the last, one block per Transformer2DModel and head dim 64.
SD2_PRESETS: dict[str, UNetPreset] = {
    "test": UNetPreset((16, 32, 32), (True, True, False), (1, 1, 1), 1, 16, 8, 32, (8, 8, 8, 8)),
    "demo": UNetPreset((32, 64, 128, 128), (True, True, True, False), (1, 1, 1, 1), 1, 32, 16, 64, (16, 32, 32, 32)),
    # At 512x512 transformer blocks take 56% of the UNet FLOPs, against 45% for the stable-diffusion-2-inpainting
    # UNet config, because with so few channels the attention over 4096 tokens weighs more.
    "bench": UNetPreset((64, 128, 384, 384), (True, True, True, False), (1, 1, 1, 1), 1, 64, 16, 64, (16, 32, 32, 32)),
}

# SDXL has no attention at the first level and several blocks per Transformer2DModel deeper down.
SDXL_PRESETS: dict[str, UNetPreset] = {
    "test": UNetPreset((16, 32, 64), (False, True, True), (1, 1, 2), 1, 16, 8, 32, (8, 8, 8, 8)),
    "demo": UNetPreset((32, 64, 128), (False, True, True), (1, 1, 2), 1, 32, 16, 64, (16, 32, 32, 32)),
    # At 512x512 transformer blocks take 73% of the UNet FLOPs. The SDXL base UNet layout gives 73% at 512x512
    # and 75% at 1024x1024 (both counted by `unet_flops`).
    "bench": UNetPreset((48, 96, 192), (False, True, True), (1, 2, 8), 1, 48, 16, 64, (16, 32, 32, 32)),
}

_build_lock = threading.Lock()


def _preset(presets: dict[str, UNetPreset], name: str) -> UNetPreset:
    if name not in presets:
        raise ValueError(f"preset={name!r} is unknown; use one of {DEMO_PRESETS}.")
    return presets[name]


def _unet_layout(spec: UNetPreset) -> dict[str, Any]:
    """UNet2DConditionModel arguments shared by both families: 9 input channels and linear projections."""
    down = tuple("CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in spec.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if attention else "UpBlock2D" for attention in reversed(spec.attention_levels))
    return {
        "in_channels": UNET_IN_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": spec.block_out_channels,
        "layers_per_block": spec.layers_per_block,
        "transformer_layers_per_block": spec.transformer_layers,
        # Head counts, as the real configs give them under this name.
        "attention_head_dim": tuple(channels // spec.head_dim for channels in spec.block_out_channels),
        "norm_num_groups": spec.norm_num_groups,
        "use_linear_projection": True,
    }


def _seeded_unet(config: dict[str, Any], seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    reinit_transformer(unet, seed=seed)
    return unet.eval()


def _vae(spec: UNetPreset, scaling_factor: float, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # Four blocks give three 2x downsamplings: 8 pixels per latent, as in the real VAEs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=min(spec.vae_channels),
        scaling_factor=scaling_factor,
        sample_size=512,
    ).eval()


def _clip_config(spec: UNetPreset, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        projection_dim=spec.text_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_encoder(spec: UNetPreset, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config(spec, tokenizer)).eval()


def _text_encoder_with_projection(spec: UNetPreset, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(spec, tokenizer)).eval()


def build_sd2_demo(folder: Path, spec: UNetPreset, seed: int) -> None:
    """Save a seeded StableDiffusionInpaintPipeline shaped like stable-diffusion-2-inpainting."""
    with _build_lock, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer()
        unet_config = {**_unet_layout(spec), "sample_size": 64, "cross_attention_dim": spec.text_hidden}
        pipe = StableDiffusionInpaintPipeline(
            vae=_vae(spec, SD2_VAE_SCALING_FACTOR, seed),
            text_encoder=_text_encoder(spec, tokenizer, seed + 1),
            tokenizer=tokenizer,
            unet=_seeded_unet(unet_config, seed + 2),
            scheduler=DDIMScheduler(**_SCHEDULER_BASE, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl_demo(folder: Path, spec: UNetPreset, seed: int) -> None:
    """Save a seeded StableDiffusionXLInpaintPipeline shaped like SDXL inpainting (two text encoders)."""
    time_embed_dim = spec.text_hidden // 4
    with _build_lock, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer()
        unet_config = {
            **_unet_layout(spec),
            "sample_size": 128,
            # Prompt embeddings concatenate the penultimate states of both encoders.
            "cross_attention_dim": 2 * spec.text_hidden,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            # Pooled embedding of the second encoder plus six size and crop values.
            "projection_class_embeddings_input_dim": spec.text_hidden + 6 * time_embed_dim,
        }
        pipe = StableDiffusionXLInpaintPipeline(
            vae=_vae(spec, SDXL_VAE_SCALING_FACTOR, seed),
            text_encoder=_text_encoder(spec, tokenizer, seed + 1),
            text_encoder_2=_text_encoder_with_projection(spec, tokenizer, seed + 2),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_seeded_unet(unet_config, seed + 3),
            scheduler=EulerDiscreteScheduler(**_SCHEDULER_BASE, interpolation_type="linear"),
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------------
# Token masks per UNet resolution


def level_masked_indices(latent_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Map each UNet resolution's token count to the row-major indices of its masked tokens.

    `latent_mask` is the (h, w) bool mask on the latent grid. Each coarser level is the 2x2 max-pool of the one
    above (ceil mode, as stride-2 convolutions round up), so a coarse token is masked when any token it covers
    is. Token counts identify levels, because they shrink strictly until a 1x1 grid.
    """
    levels: dict[int, torch.Tensor] = {}
    current = latent_mask.to(torch.float32)[None, None]
    while True:
        flat = current.reshape(-1) > 0
        levels[flat.numel()] = torch.nonzero(flat).reshape(-1)
        if current.shape[-1] == 1 and current.shape[-2] == 1:
            return levels
        current = F.max_pool2d(current, kernel_size=2, stride=2, ceil_mode=True)


# ---------------------------------------------------------------------------------------------------------
# Attention processors for the self-attention (attn1) of BasicTransformerBlock


def _check_plain_self_attention(attn: Attention, attention_mask: torch.Tensor | None) -> None:
    """Reject attention features SD 2 and SDXL blocks do not use, which these processors do not implement."""
    if attention_mask is not None:
        raise ValueError("Masked UNet attention does not support attention_mask. Pass attention_mask=None.")
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise ValueError("Masked UNet attention supports plain self-attention without spatial or group norm only.")


def _project_heads(attn: Attention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return query, key and value (B, heads, S, head_dim) of self-attention over (B, S, C), as AttnProcessor2_0."""
    batch = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention and output projection as AttnProcessor2_0 computes them; returns (B, S, C)."""
    batch, heads, _, head_dim = query.shape
    attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    attended = attended.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    attended = attn.to_out[1](attn.to_out[0](attended))
    return attended / attn.rescale_output_factor


@dataclass
class UNetRecorder:
    """K/V per (step, block), and output hidden states of the blocks in `output_blocks`, from a recording run."""

    num_steps: int
    num_blocks: int
    output_blocks: frozenset[int]
    keys: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    values: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    hidden: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def check_step(self, step: int) -> None:
        if step >= self.num_steps:
            raise RuntimeError(f"The UNet ran a step {step} beyond the {self.num_steps} requested steps.")

    def blocks(self) -> list[list[BlockActivations]]:
        """Return the complete BlockActivations grid; raise RuntimeError when some step or block is missing."""
        grid: list[list[BlockActivations]] = []
        for step in range(self.num_steps):
            row = []
            for block in range(self.num_blocks):
                key = (step, block)
                if key not in self.keys or (block in self.output_blocks and key not in self.hidden):
                    raise RuntimeError(f"The recording run produced no activations for step {step}, block {block}.")
                row.append(BlockActivations(k=self.keys[key], v=self.values[key], hidden=self.hidden.get(key)))
            grid.append(row)
        return grid


class RecordingSelfAttnProcessor:
    """Stock self-attention (as AttnProcessor2_0) that also stores the K/V of all tokens."""

    def __init__(self, block: int, cursor: StepCursor, recorder: UNetRecorder) -> None:
        self.block = block
        self.cursor = cursor
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_plain_self_attention(attn, attention_mask)
        query, key, value = _project_heads(attn, hidden_states)
        self.recorder.check_step(self.cursor.step)
        self.recorder.keys[(self.cursor.step, self.block)] = key.contiguous()
        self.recorder.values[(self.cursor.step, self.block)] = value.contiguous()
        return _attend(attn, query, key, value)


class CachedSelfAttnProcessor:
    """Self-attention of masked tokens over their fresh K/V and the cached K/V of the unmasked tokens.

    Keys keep their positions: the cached K/V of all tokens are copied into a buffer reused across steps, then
    the fresh masked rows overwrite theirs, so the result does not depend on the order of summation.
    """

    def __init__(
        self, block: int, cursor: StepCursor, source: BlockCacheSource, levels: dict[int, torch.Tensor]
    ) -> None:
        self.block = block
        self.cursor = cursor
        self.source = source
        self.levels = levels
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _buffers(self, like: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key_buffer is None or self._key_buffer.shape != shape or self._key_buffer.dtype != like.dtype:
            self._key_buffer = like.new_empty(shape)
            self._value_buffer = like.new_empty(shape)
        assert self._value_buffer is not None
        return self._key_buffer, self._value_buffer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_plain_self_attention(attn, attention_mask)
        query, key, value = _project_heads(attn, hidden_states)
        entry = self.source.get(self.cursor.step, self.block)
        if entry.k is None or entry.v is None:
            raise ValueError(f"Cached block {self.block} at step {self.cursor.step} has no K/V tensors.")
        if entry.k.shape[0] != key.shape[0] or entry.k.shape[1] != key.shape[1] or entry.k.shape[3] != key.shape[3]:
            raise ValueError(
                f"Cached K of block {self.block} has shape {tuple(entry.k.shape)}, which does not fit fresh keys "
                f"{tuple(key.shape)}; the cache belongs to another model or guidance setting."
            )
        masked = self.levels[entry.k.shape[2]]
        key_all, value_all = self._buffers(key, entry.k.shape)
        key_all.copy_(entry.k)
        value_all.copy_(entry.v)
        key_all.index_copy_(2, masked, key)
        value_all.index_copy_(2, masked, value)
        return _attend(attn, query, key_all, value_all)


# ---------------------------------------------------------------------------------------------------------
# UNet structure, hooks and the two runs


@dataclass(frozen=True)
class UNetBlocks:
    """The BasicTransformerBlocks of a UNet in module order (their global cache index) and their groups."""

    names: list[str]
    blocks: list[BasicTransformerBlock]
    groups: list[Transformer2DModel]

    @classmethod
    def of(cls, unet: UNet2DConditionModel) -> UNetBlocks:
        names, blocks, groups = [], [], []
        for name, module in unet.named_modules():
            if isinstance(module, BasicTransformerBlock):
                names.append(name)
                blocks.append(module)
            elif isinstance(module, Transformer2DModel):
                groups.append(module)
        return cls(names=names, blocks=blocks, groups=groups)

    def index(self, block: torch.nn.Module) -> int:
        return next(i for i, candidate in enumerate(self.blocks) if candidate is block)

    def group_outputs(self) -> frozenset[int]:
        """Return the indices of the last block of each group, whose outputs a masked run reads."""
        return frozenset(self.index(group.transformer_blocks[-1]) for group in self.groups)


def _swap_self_attention(unet: UNet2DConditionModel, blocks: UNetBlocks, processors: list[object]) -> dict[str, Any]:
    """Install one attn1 processor per block through `set_attn_processor`; return the processors it replaces."""
    original = unet.attn_processors
    replacement = dict(original)
    for name, processor in zip(blocks.names, processors, strict=True):
        replacement[f"{name}.attn1.processor"] = processor
    unet.set_attn_processor(replacement)
    return original


def _hidden_states_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _step_counter(cursor: StepCursor) -> Callable[..., None]:
    """Return a UNet forward pre-hook that sets `cursor.step` to the number of earlier UNet calls of the run."""
    calls = [0]

    def count(_module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
        cursor.step = calls[0]
        calls[0] += 1

    return count


def _install_recording_hooks(
    unet: UNet2DConditionModel, blocks: UNetBlocks, cursor: StepCursor, recorder: UNetRecorder
) -> list[torch.utils.hooks.RemovableHandle]:
    def store_output(index: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> None:
            recorder.hidden[(cursor.step, index)] = output.clone()

        return hook

    hooks = [unet.register_forward_pre_hook(_step_counter(cursor))]
    hooks += [blocks.blocks[i].register_forward_hook(store_output(i)) for i in sorted(recorder.output_blocks)]
    return hooks


def _install_masked_hooks(
    unet: UNet2DConditionModel,
    blocks: UNetBlocks,
    cursor: StepCursor,
    source: BlockCacheSource,
    levels: dict[int, torch.Tensor],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Make every Transformer2DModel run its blocks on masked tokens only.

    The first block of each receives the masked tokens. The last block's output is scattered into its cached
    output, so proj_out and everything after it see all tokens.
    """

    def gather(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        hidden_states = _hidden_states_argument(args, kwargs)
        selected = hidden_states.index_select(1, levels[hidden_states.shape[1]])
        if args:
            return (selected, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": selected}

    def scatter(index: int) -> Callable[..., torch.Tensor]:
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            cached = source.get(cursor.step, index).hidden
            if cached is None:
                raise ValueError(f"Cached block {index} at step {cursor.step} has no hidden states.")
            full = cached.to(device=output.device, dtype=output.dtype, copy=True)
            return full.index_copy_(1, levels[full.shape[1]], output)

        return hook

    hooks = [unet.register_forward_pre_hook(_step_counter(cursor))]
    for group in blocks.groups:
        first, last = group.transformer_blocks[0], group.transformer_blocks[-1]
        hooks.append(first.register_forward_pre_hook(gather, with_kwargs=True))
        hooks.append(last.register_forward_hook(scatter(blocks.index(last))))
    return hooks


def _initial_noise(pipe: Any, seed: int, height: int, width: int) -> tuple[torch.Tensor, torch.Generator]:
    """Draw the initial noise as the stock pipeline does first, and return it with the advanced generator.

    Passing this noise as `latents` together with the generator reproduces the stock random stream: with
    strength 1.0 and a 9-channel UNet the pipeline's first draw is this noise, and its next draw samples the
    masked-image latents. The exactness tests compare against plain stock runs, which checks this.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (1, LATENT_CHANNELS, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=pipe.unet.dtype)
    return noise, generator


def _run_instrumented(
    pipe: Any,
    blocks: UNetBlocks,
    processors: list[object],
    install_hooks: Callable[[], list[torch.utils.hooks.RemovableHandle]],
    *,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    noise: torch.Tensor,
    generator: torch.Generator,
    steps: int,
    guidance_scale: float,
    output_type: str,
    callback: Callable[..., dict],
) -> Any:
    """Run the stock pipeline with `processors` on the blocks' self-attention and the hooks `install_hooks` adds.

    The run uses strength 1.0, and `noise` and `generator` from `_initial_noise` keep the stock random stream.
    The UNet's processors and hooks are restored afterwards, also when the run raises.
    """
    width, height = image.size
    unet = pipe.unet
    original = _swap_self_attention(unet, blocks, processors)
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    try:
        hooks = install_hooks()
        with torch.inference_mode():
            return pipe(
                prompt=prompt,
                image=image,
                mask_image=mask,
                height=height,
                width=width,
                strength=1.0,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                latents=noise,
                output_type=output_type,
                callback_on_step_end=callback,
            )
    finally:
        for hook in hooks:
            hook.remove()
        unet.set_attn_processor(original)


def _check_size(pipe: Any, height: int, width: int) -> None:
    multiple = working_multiple(pipe)
    if height % multiple or width % multiple:
        raise ValueError(f"Image size {height}x{width} is not a multiple of {multiple} pixels; pad it first.")


def record_run(
    pipe: Any,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    on_progress: StepCallback | None = None,
) -> TemplateActivations:
    """Run the stock pipeline on `image` and `mask` (strength 1.0) and record every block of every step.

    The warm-up passes an empty mask. With any other mask this records a request's own run, whose unmasked
    activations are exactly what a masked run of that request needs.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    width, height = image.size
    _check_size(pipe, height, width)
    unet = pipe.unet
    blocks = UNetBlocks.of(unet)
    cursor = StepCursor()
    recorder = UNetRecorder(num_steps=steps, num_blocks=len(blocks.blocks), output_blocks=blocks.group_outputs())
    trajectory: list[torch.Tensor] = []

    def after_step(_pipe: Any, index: int, _t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:
        trajectory.append(tensors["latents"][0].clone())
        if on_progress is not None:
            on_progress(index + 1, steps)
        return {}

    noise, generator = _initial_noise(pipe, seed, height, width)
    processors = [RecordingSelfAttnProcessor(i, cursor, recorder) for i in range(len(blocks.blocks))]
    _run_instrumented(
        pipe, blocks, processors, lambda: _install_recording_hooks(unet, blocks, cursor, recorder),
        image=image, mask=mask, prompt=prompt, noise=noise, generator=generator, steps=steps,
        guidance_scale=guidance_scale, output_type="latent", callback=after_step,
    )

    if len(trajectory) != steps:
        raise RuntimeError(
            f"The scheduler ran {len(trajectory)} steps instead of {steps}; use one that calls the UNet once per step."
        )
    # The pipeline scales the noise by init_noise_sigma to get its first latents.
    trajectory.insert(0, noise[0] * pipe.scheduler.init_noise_sigma)
    latent_grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    metadata = ActivationsMetadata(
        variant="kv",
        num_steps=steps,
        num_blocks=len(blocks.blocks),
        num_double_blocks=0,
        grid=latent_grid,
        dtype=noise.dtype,
        seed=seed,
        guidance_scale=float(guidance_scale),
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        warmup_prompt=prompt,
    )
    activations = TemplateActivations(metadata=metadata, latents=torch.stack(trajectory), blocks=recorder.blocks())
    logger.info(
        "Recorded UNet activations: %d steps x %d blocks on a %dx%d latent grid, %.1f MiB",
        steps,
        len(blocks.blocks),
        *latent_grid,
        activations.nbytes / 2**20,
    )
    return activations


def check_compatible(
    metadata: ActivationsMetadata, pipe: Any, *, seed: int, steps: int, guidance_scale: float, height: int, width: int
) -> None:
    """Raise ValueError when cached activations were recorded with settings other than the request's."""
    expected = {
        "seed": (metadata.seed, seed),
        "steps": (metadata.num_steps, steps),
        "guidance_scale": (metadata.guidance_scale, float(guidance_scale)),
        "height": (metadata.height, height),
        "width": (metadata.width, width),
        "transformer blocks": (metadata.num_blocks, len(UNetBlocks.of(pipe.unet).blocks)),
        "dtype": (metadata.dtype, pipe.unet.dtype),
    }
    for name, (cached, requested) in expected.items():
        if cached != requested:
            raise ValueError(
                f"Request {name}={requested!r} does not match the cached activations ({cached!r}). "
                "Warm the template up again with the request's settings."
            )


def masked_run(
    pipe: Any,
    activations: TemplateActivations,
    image: Image.Image,
    mask: Image.Image,
    latent_mask: np.ndarray,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    on_step: StepCallback | None = None,
) -> MaskedOutput:
    """Run the stock pipeline on `image` and `mask` with only the tokens of `latent_mask` (h, w) recomputed.

    `mask` conditions the inpainting UNet as in a stock run. `latent_mask` selects the recomputed tokens and is
    normally the dilated token mask of the same pixels. Unmasked latents follow the cached trajectory.
    NOTE: this swaps the UNet's processors and hooks for the duration of the call, so a pipeline must not run
    two requests at once.
    """
    width, height = image.size
    check_compatible(
        activations.metadata, pipe, seed=seed, steps=steps, guidance_scale=guidance_scale, height=height, width=width
    )
    grid = activations.metadata.grid
    if tuple(latent_mask.shape) != grid:
        raise ValueError(f"latent_mask has shape {latent_mask.shape}, expected the latent grid {grid}.")
    if not latent_mask.any():
        raise ValueError("latent_mask selects no token. A masked edit needs at least one masked pixel.")
    device = pipe._execution_device
    recomputed = torch.as_tensor(np.ascontiguousarray(latent_mask), device=device)
    levels = level_masked_indices(recomputed)
    source = InMemoryBlockCacheSource(activations)
    unet = pipe.unet
    blocks = UNetBlocks.of(unet)
    cursor = StepCursor()
    trajectory = activations.latents
    final: list[torch.Tensor] = []

    def follow_trajectory(_pipe: Any, index: int, _t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:
        cached = trajectory[index + 1].to(device=device, dtype=tensors["latents"].dtype)
        latents = torch.where(recomputed, tensors["latents"], cached)
        if index == steps - 1:
            final.append(latents[0].clone())
        if on_step is not None:
            on_step(index + 1, steps)
        return {"latents": latents}

    noise, generator = _initial_noise(pipe, seed, height, width)
    processors = [CachedSelfAttnProcessor(i, cursor, source, levels) for i in range(len(blocks.blocks))]
    output = _run_instrumented(
        pipe, blocks, processors, lambda: _install_masked_hooks(unet, blocks, cursor, source, levels),
        image=image, mask=mask, prompt=prompt, noise=noise, generator=generator, steps=steps,
        guidance_scale=guidance_scale, output_type="pil", callback=follow_trajectory,
    )
    if not final:
        raise RuntimeError(f"The scheduler ran fewer than {steps} steps; use one that calls the UNet once per step.")
    return MaskedOutput(generated=np.asarray(output.images[0], dtype=np.uint8), latents=final[0])


# ---------------------------------------------------------------------------------------------------------
# FLOP count


@dataclass(frozen=True)
class UNetFlops:
    """FLOPs of one UNet forward pass (batch 1), split into what masking leaves alone and what it scales.

    `blocks_by_tokens` maps a resolution's token count to the FLOPs of all transformer blocks there. Every part
    of a block (projections, attention over all keys, cross-attention, feed-forward) is linear in the number
    of query tokens. So masking m of N tokens multiplies that level's block FLOPs by m / N.
    """

    fixed: float
    blocks_by_tokens: dict[int, float]

    @property
    def total(self) -> float:
        return self.fixed + sum(self.blocks_by_tokens.values())

    def masked(self, masked_by_tokens: dict[int, int]) -> float:
        scaled = sum(flops * masked_by_tokens[tokens] / tokens for tokens, flops in self.blocks_by_tokens.items())
        return self.fixed + scaled


def _count_unet_flops(config_json: str, height: int, width: int, text_tokens: int) -> UNetFlops:
    """Trace one forward pass of a meta-device copy of the UNet with hooks counting 2 FLOPs per multiply-add.

    Counted: every Conv2d and Linear (including those of time and added embeddings) and attention (QK^T and AV).
    Not counted: norms, activations, softmax, resampling and additions, which are linear in tokens and small.
    """
    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    fixed = [0.0]
    by_tokens: dict[int, float] = {}
    current: list[int | None] = [None]

    def add(flops: float) -> None:
        if current[0] is None:
            fixed[0] += flops
        else:
            by_tokens[current[0]] = by_tokens.get(current[0], 0.0) + flops

    def conv(module: torch.nn.Conv2d, _args: tuple, output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        add(2.0 * output.numel() * (module.in_channels // module.groups) * kernel)

    def linear(module: torch.nn.Linear, _args: tuple, output: torch.Tensor) -> None:
        add(2.0 * output.numel() * module.in_features)

    def attention(module: Attention, args: tuple, kwargs: dict, _output: torch.Tensor) -> None:
        queries = _hidden_states_argument(args, kwargs)
        context = kwargs.get("encoder_hidden_states")
        keys = queries.shape[1] if context is None else context.shape[1]
        add(4.0 * queries.shape[0] * queries.shape[1] * keys * module.inner_dim)

    def enter_block(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        current[0] = _hidden_states_argument(args, kwargs).shape[1]

    def leave_block(_module: torch.nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        current[0] = None

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
        elif isinstance(module, Attention):
            module.register_forward_hook(attention, with_kwargs=True)
        elif isinstance(module, BasicTransformerBlock):
            module.register_forward_pre_hook(enter_block, with_kwargs=True)
            module.register_forward_hook(leave_block)

    meta = {"device": "meta", "dtype": torch.float32}
    sample = torch.zeros(1, config["in_channels"], height // 8, width // 8, **meta)
    context = torch.zeros(1, text_tokens, config["cross_attention_dim"], **meta)
    added: dict[str, torch.Tensor] | None = None
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        # One time id: the added embedding's FLOPs depend only on its input width, not on the split.
        pooled = config["projection_class_embeddings_input_dim"] - time_dim
        added = {"text_embeds": torch.zeros(1, pooled, **meta), "time_ids": torch.zeros(1, 1, **meta)}
    with torch.inference_mode():
        unet(sample, torch.tensor(500.0, **meta), encoder_hidden_states=context, added_cond_kwargs=added)
    return UNetFlops(fixed=fixed[0], blocks_by_tokens=by_tokens)


@functools.lru_cache(maxsize=32)
def unet_flops(config_json: str, height: int, width: int, text_tokens: int) -> UNetFlops:
    """Cached `_count_unet_flops`: the trace costs a fraction of a second, and callers ask for few sizes."""
    return _count_unet_flops(config_json, height, width, text_tokens)


# ---------------------------------------------------------------------------------------------------------
# Families


def working_multiple(pipe: Any) -> int:
    """Pixels per latent times 2 per downsampling, so every UNet resolution divides evenly."""
    downsamplings = sum(block.downsamplers is not None for block in pipe.unet.down_blocks)
    return pipe.vae_scale_factor * 2**downsamplings


class UNetFamily(ModelFamily):
    """Shared implementation of the masked path for 9-channel UNet inpainting pipelines."""

    variants: ClassVar[tuple[str, ...]] = ("kv",)
    presets: ClassVar[dict[str, UNetPreset]]

    def build_demo(self, folder: Path, preset: str, *, seed: int = 0) -> None:
        spec = _preset(self.presets, preset)
        logger.info("Building %s demo model preset=%s seed=%d into %s", self.name, preset, seed, folder)
        self._save_demo(Path(folder), spec, seed)

    @abstractmethod
    def _save_demo(self, folder: Path, spec: UNetPreset, seed: int) -> None:
        """Build this family's pipeline from `spec` with seeded weights and save it to `folder`."""

    def working_multiple(self, pipe: Any) -> int:
        return working_multiple(pipe)

    def pixels_per_token(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def native_resolution(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        # CLIP pads or truncates every prompt to its fixed length, whatever the requested maximum.
        return int(pipe.tokenizer.model_max_length)

    def flop_fraction(
        self, pipe: Any, *, height: int, width: int, token_mask: np.ndarray, text_tokens: int, variant: str
    ) -> float:
        self._check_variant(variant)
        _check_size(pipe, height, width)
        grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if tuple(token_mask.shape) != grid:
            raise ValueError(f"token_mask has shape {token_mask.shape}, expected the latent grid {grid}.")
        config_json = json.dumps(dict(pipe.unet.config), sort_keys=True, default=list)
        flops = unet_flops(config_json, height, width, text_tokens)
        levels = level_masked_indices(torch.as_tensor(np.asarray(token_mask, dtype=bool)))
        masked = {tokens: int(indices.numel()) for tokens, indices in levels.items()}
        return flops.masked(masked) / flops.total

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
        def report(_pipe: Any, index: int, _t: torch.Tensor, _tensors: dict) -> dict:
            if on_step is not None:
                on_step(index + 1, steps)
            return {}

        width, height = image.size
        with torch.inference_mode():
            output = pipe(
                prompt=prompt,
                image=image.convert("RGB"),
                mask_image=mask.convert("L"),
                height=height,
                width=width,
                strength=1.0,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
                callback_on_step_end=report,
            )
        return np.asarray(output.images[0], dtype=np.uint8)

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
        self._check_variant(variant)
        template = to_pil_image(image)
        return record_run(
            pipe,
            template,
            Image.new("L", template.size, 0),
            prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
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
    ) -> MaskedOutput:
        pixels = np.asarray(mask, dtype=bool)
        latent_mask = pixel_to_token_mask(pixels, patch=self.pixels_per_token(pipe), dilation=dilation)
        return masked_run(
            pipe,
            activations,
            to_pil_image(image),
            mask_to_pil(pixels),
            latent_mask,
            prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            on_step=on_step,
        )

    def _check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(f"variant must be one of {self.variants} for {self.name}, got {variant!r}.")


class SDXLFamily(UNetFamily):
    """SDXL inpainting (StableDiffusionXLInpaintPipeline): two text encoders, text_time added embedding."""

    name: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[type] = StableDiffusionXLInpaintPipeline
    presets: ClassVar[dict[str, UNetPreset]] = SDXL_PRESETS

    def _save_demo(self, folder: Path, spec: UNetPreset, seed: int) -> None:
        build_sdxl_demo(folder, spec, seed)


class SD2Family(UNetFamily):
    """Stable Diffusion 2 inpainting (StableDiffusionInpaintPipeline): one CLIP text encoder, DDIM in the demo."""

    name: ClassVar[str] = "sd2"
    pipeline_class: ClassVar[type] = StableDiffusionInpaintPipeline
    presets: ClassVar[dict[str, UNetPreset]] = SD2_PRESETS

    def _save_demo(self, folder: Path, spec: UNetPreset, seed: int) -> None:
        build_sd2_demo(folder, spec, seed)
