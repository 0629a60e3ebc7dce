"""Stable Diffusion 3 inpainting (StableDiffusion3InpaintPipeline, a 16-channel MMDiT) on the model-family interface.

The stock pipeline with a 16-channel transformer denoises the whole latent image and, after every step, puts the
template's latents, noised to the next step's sigma, back wherever the latent mask is 0. A warm-up on the template
with an empty mask therefore follows exactly that noised-template trajectory and ends on the template's VAE
latents. A masked edit recomputes only the text tokens and the image tokens the mask touches. Their queries
attend to their own fresh K/V plus the warm-up's cached K/V of the other image tokens at the same step and
layer. Every latent outside the latent mask follows the cached trajectory, because the stock blend puts it there.

The stock `SD3Transformer2DModel` runs unchanged. Attention processors (installed with `set_attn_processor`)
record or reuse K/V. The "hidden" cache variant stores the image tokens' hidden states entering each attention
layer instead, at half the bytes, and the masked run recomputes the unmasked tokens' K/V from them. A forward
hook on `pos_embed` keeps only the masked tokens after the positional embedding. A forward hook on `proj_out`
scatters their outputs back onto the full token grid before unpatchify.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
)
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import (
    calculate_shift,
    retrieve_timesteps,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from workers.demo_model import build_clip_tokenizer, build_t5_tokenizer, reinit_transformer
from workers.families.base import MaskedOutput, ModelFamily, StepCallback
from workers.masked.activations import (
    ActivationsMetadata,
    BlockActivations,
    BlockCacheSource,
    InMemoryBlockCacheSource,
    TemplateActivations,
    Variant,
)
from workers.masked.edit import mask_to_pil
from workers.masked.processors import ActivationRecorder, StepCursor
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import to_pil_image

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
# Latent normalisation of the SD3 VAE and the SD3 scheduler (timestep shift 3.0, no dynamic shifting), as public
# SD3 configurations list them.
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_SCHEDULER_CONFIG: dict[str, float | int] = {"num_train_timesteps": 1000, "shift": 3.0}
VAE_NORM_GROUPS = 8


@dataclass(frozen=True)
class SD3Preset:
    """Sizes of one demo model. `sample_size` is the latent side of the native resolution."""

    layers: int
    heads: int
    head_dim: int
    clip_hidden: int
    vae_channels: tuple[int, int, int, int]
    sample_size: int
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()


SD3_PRESETS: dict[str, SD3Preset] = {
    # Smallest useful model for tests, with the SD3.5 layer kinds (QK RMS norm and one block with a second,
    # image-only attention layer) so that tests cover both attention shapes.
    "test": SD3Preset(3, 2, 16, 32, (16, 16, 16, 16), 16, qk_norm="rms_norm", dual_attention_layers=(0,)),
    # A 512x512 edit with 20 steps runs in seconds on 2 CPU cores.
    "demo": SD3Preset(3, 4, 32, 64, (16, 32, 32, 32), 64),
    # Transformer-dominated compute for benchmarks: hidden size 8 heads x 64 = 512, six blocks.
    "bench": SD3Preset(6, 8, 64, 64, (16, 32, 32, 32), 64),
}


def build_sd3_demo(folder: Path, *, preset: str, seed: int = 0) -> Path:
    """Save a StableDiffusion3InpaintPipeline with seeded weights to `folder`; return `folder`.

    All three text encoders are present (a stock `from_pretrained` refuses a folder without `text_encoder_3`),
    so the text sequence has 77 CLIP tokens plus `max_sequence_length` T5 tokens, as with a full checkpoint.
    """
    if preset not in SD3_PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; use one of {sorted(SD3_PRESETS)}")
    spec = SD3_PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer()
        t5_tokenizer = build_t5_tokenizer()
        pipe = StableDiffusion3InpaintPipeline(
            transformer=_build_transformer(spec, seed + 3),
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
            vae=_build_vae(spec, seed),
            text_encoder=_build_clip(spec, tokenizer, seed + 1),
            tokenizer=tokenizer,
            text_encoder_2=_build_clip(spec, tokenizer, seed + 2),
            tokenizer_2=build_clip_tokenizer(),
            text_encoder_3=_build_t5(spec, t5_tokenizer, seed + 4),
            tokenizer_3=t5_tokenizer,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    logger.info("Built SD3 demo model preset=%s seed=%d into %s", preset, seed, folder)
    return Path(folder)


def _build_transformer(spec: SD3Preset, seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    hidden = spec.heads * spec.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=spec.layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        # The T5 width; the pipeline pads both CLIP encoders' hidden states, side by side, to it.
        joint_attention_dim=_t5_hidden(spec),
        caption_projection_dim=hidden,
        pooled_projection_dim=2 * spec.clip_hidden,
        out_channels=LATENT_CHANNELS,
        # Positions for up to twice the native side, in patches.
        pos_embed_max_size=spec.sample_size,
        dual_attention_layers=spec.dual_attention_layers,
        qk_norm=spec.qk_norm,
    )
    reinit_transformer(transformer, seed=seed)
    return transformer.eval()


def _build_vae(spec: SD3Preset, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # Four blocks give three 2x downsamplings, the 8x factor of the SD3 VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_NORM_GROUPS,
        scaling_factor=SD3_VAE_SCALING_FACTOR,
        shift_factor=SD3_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=spec.sample_size * 8,
    ).eval()


def _build_clip(spec: SD3Preset, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.clip_hidden,
        intermediate_size=spec.clip_hidden * 2,
        projection_dim=spec.clip_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _t5_hidden(spec: SD3Preset) -> int:
    """T5 width: as wide as both CLIP encoders side by side, as in SD3 (4096 >= 768 + 1280)."""
    return 2 * spec.clip_hidden


def _build_t5(spec: SD3Preset, tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    hidden = _t5_hidden(spec)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=hidden * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


# Attention layers ---------------------------------------------------------------------------------------------


def attention_layers(transformer: SD3Transformer2DModel) -> list[tuple[str, Attention]]:
    """Return (processor name, module) of every attention layer in cache order: each block's joint attention,
    then its image-only `attn2` where the block has one (SD3.5)."""
    layers: list[tuple[str, Attention]] = []
    for index, block in enumerate(transformer.transformer_blocks):
        layers.append((f"transformer_blocks.{index}.attn.processor", block.attn))
        if block.attn2 is not None:
            layers.append((f"transformer_blocks.{index}.attn2.processor", block.attn2))
    return layers


def _project(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return query, key, value (B, heads, S, head_dim) after the QK norms, image tokens then text tokens.

    The same operations in the same order as diffusers' `JointAttnProcessor2_0`, so the results are bitwise equal.
    """
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
    if encoder_hidden_states is None:
        return query, key, value

    text_query = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    text_key = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    text_value = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    query = torch.cat([query, text_query], dim=2)
    key = torch.cat([key, text_key], dim=2)
    value = torch.cat([value, text_value], dim=2)
    return query, key, value


def _output(
    attn: Attention, attended: torch.Tensor, num_image: int, has_text: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply the output projections to attention output (B, heads, S, head_dim) as `JointAttnProcessor2_0` does."""
    batch, heads, _tokens, head_dim = attended.shape
    hidden_states = attended.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    encoder_hidden_states = None
    if has_text:
        hidden_states, encoder_hidden_states = hidden_states[:, :num_image], hidden_states[:, num_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if encoder_hidden_states is None:
        return hidden_states
    return hidden_states, encoder_hidden_states


class RecordingJointAttnProcessor:
    """Stock SD3 attention that also stores the image tokens' activations.

    Variant "kv" stores their K and V, shape (B * heads, N_img, head_dim); variant "hidden" stores the hidden
    states entering the layer, shape (B, N_img, D). B is 2 under classifier-free guidance (unconditional half
    first), so both halves are kept.
    """

    def __init__(self, layer: int, cursor: StepCursor, recorder: ActivationRecorder) -> None:
        self.layer = layer
        self.cursor = cursor
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        num_image = hidden_states.shape[1]
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1]
        if self.recorder.variant == "hidden":
            entry = BlockActivations(hidden=hidden_states.clone())
        else:
            entry = BlockActivations(
                k=key[:, :, :num_image].reshape(-1, num_image, head_dim).clone(),
                v=value[:, :, :num_image].reshape(-1, num_image, head_dim).clone(),
            )
        self.recorder.store(self.cursor.step, self.layer, entry)
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return _output(attn, attended.to(query.dtype), num_image, encoder_hidden_states is not None)


class CachedJointAttnProcessor:
    """SD3 attention whose queries (masked image and text tokens) also attend to cached unmasked image K/V.

    Attention is permutation invariant over keys, so the cached keys follow the fresh ones.
    """

    def __init__(
        self, layer: int, cursor: StepCursor, source: BlockCacheSource, unmasked: torch.Tensor, variant: Variant = "kv"
    ) -> None:
        self.layer = layer
        self.cursor = cursor
        self.source = source
        self.unmasked = unmasked
        self.variant = variant
        # (B, heads, S_fresh + N_unmasked, head_dim), reused across steps: allocating and concatenating anew on
        # every call costs more than the copies themselves.
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _buffers(self, fresh_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, fresh_tokens, head_dim = fresh_key.shape
        shape = (batch, heads, fresh_tokens + self.unmasked.numel(), head_dim)
        if self._key_buffer is None or self._key_buffer.shape != shape or self._key_buffer.dtype != fresh_key.dtype:
            self._key_buffer = fresh_key.new_empty(shape)
            self._value_buffer = fresh_key.new_empty(shape)
        assert self._value_buffer is not None
        return self._key_buffer, self._value_buffer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CachedJointAttnProcessor does not support attention_mask. Pass attention_mask=None.")
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        batch, heads, fresh_tokens, head_dim = key.shape
        entry = self.source.get(self.cursor.step, self.layer)
        key_buffer, value_buffer = self._buffers(key)
        key_buffer[:, :, :fresh_tokens].copy_(key)
        value_buffer[:, :, :fresh_tokens].copy_(value)
        if self.variant == "hidden":
            self._recompute_cached(attn, entry, key_buffer[:, :, fresh_tokens:], value_buffer[:, :, fresh_tokens:])
        else:
            if entry.k is None or entry.v is None:
                raise ValueError(f"Cached layer {self.layer} at step {self.cursor.step} has no K/V tensors.")
            if entry.k.shape[0] != batch * heads:
                raise ValueError(
                    f"Invalid cached K/V for layer {self.layer}: {entry.k.shape[0]} batch x head rows, expected "
                    f"{batch * heads}. Warm the template up with the request's guidance scale."
                )
            # Rows (B * heads) of the buffers, as the cache stores them; the cached keys go after the fresh ones.
            rows = (batch * heads, key_buffer.shape[2], head_dim)
            torch.index_select(entry.k, 1, self.unmasked, out=key_buffer.view(rows)[:, fresh_tokens:])
            torch.index_select(entry.v, 1, self.unmasked, out=value_buffer.view(rows)[:, fresh_tokens:])
        attended = F.scaled_dot_product_attention(query, key_buffer, value_buffer, dropout_p=0.0, is_causal=False)
        return _output(attn, attended.to(query.dtype), hidden_states.shape[1], encoder_hidden_states is not None)

    def _recompute_cached(
        self, attn: Attention, entry: BlockActivations, key_cache: torch.Tensor, value_cache: torch.Tensor
    ) -> None:
        """Compute the unmasked tokens' K/V from their cached hidden states into views (B, heads, N_unmasked, d)."""
        if entry.hidden is None:
            raise ValueError(f"Cached layer {self.layer} at step {self.cursor.step} has no hidden states.")
        batch, heads, _tokens, head_dim = key_cache.shape
        if entry.hidden.shape[0] != batch:
            raise ValueError(
                f"Invalid cached hidden states for layer {self.layer}: batch {entry.hidden.shape[0]}, expected "
                f"{batch}. Warm the template up with the request's guidance scale."
            )
        hidden = entry.hidden.index_select(1, self.unmasked)
        key = attn.to_k(hidden).view(batch, -1, heads, head_dim).transpose(1, 2)
        value = attn.to_v(hidden).view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key_cache.copy_(key)
        value_cache.copy_(value)


# Warm-up ------------------------------------------------------------------------------------------------------


def record_activations(
    pipe: StableDiffusion3InpaintPipeline,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    variant: Variant = "kv",
    on_progress: StepCallback | None = None,
) -> TemplateActivations:
    """Run the stock pipeline (strength 1.0) on `image` and `mask` and record every step's and layer's image K/V
    (or, for variant "hidden", the image hidden states entering each layer).

    `latents` contains the transformer input latents (16, h, w) of every step, then the final latents. With an empty
    `mask` this is the warm-up; with a request's mask it records what a full run of that request computes.
    """
    width, height = image.size
    grid = token_grid(pipe, height, width)
    transformer = pipe.transformer
    layers = attention_layers(transformer)
    cursor = StepCursor()
    recorder = ActivationRecorder(variant, steps, len(layers), grid[0] * grid[1])
    trajectory: list[torch.Tensor] = []

    def record_input_latents(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cursor.step = len(trajectory)
        trajectory.append(hidden_states[0].clone())

    def report_step(_pipe: Any, index: int, _t: torch.Tensor, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_progress is not None:
            on_progress(index + 1, steps)
        return callback_kwargs

    original = transformer.attn_processors
    transformer.set_attn_processor(
        {name: RecordingJointAttnProcessor(layer, cursor, recorder) for layer, (name, _attn) in enumerate(layers)}
    )
    hook = transformer.register_forward_pre_hook(record_input_latents, with_kwargs=True)
    try:
        with torch.inference_mode():
            output = pipe(
                prompt=prompt,
                image=image,
                mask_image=mask,
                height=height,
                width=width,
                strength=1.0,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                max_sequence_length=max_sequence_length,
                output_type="latent",
                callback_on_step_end=report_step,
            )
    finally:
        hook.remove()
        transformer.set_attn_processor(original)

    final_latents = output.images[0]
    trajectory.append(final_latents.clone())
    metadata = ActivationsMetadata(
        variant=variant,
        num_steps=steps,
        num_blocks=len(layers),
        num_double_blocks=len(layers),
        grid=grid,
        dtype=final_latents.dtype,
        seed=seed,
        guidance_scale=float(guidance_scale),
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        warmup_prompt=prompt,
    )
    return TemplateActivations(metadata=metadata, latents=torch.stack(trajectory), blocks=_complete(recorder))


def _complete(recorder: ActivationRecorder) -> list[list[BlockActivations]]:
    blocks: list[list[BlockActivations]] = []
    for step, entries in enumerate(recorder.blocks):
        missing = [layer for layer, entry in enumerate(entries) if entry is None]
        if missing:
            raise RuntimeError(f"The run recorded no activations for step {step}, layers {missing}.")
        blocks.append([entry for entry in entries if entry is not None])
    return blocks


def token_grid(pipe: StableDiffusion3InpaintPipeline, height: int, width: int) -> tuple[int, int]:
    """Return the token grid; raise ValueError when the size is not a multiple of the token side."""
    patch = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if height % patch or width % patch:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the {patch}-pixel token size. Pad it first."
        )
    return height // patch, width // patch


# Masked denoising ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextConditioning:
    """Transformer text inputs as the stock pipeline builds them: unconditional half first under guidance."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.prompt_embeds.shape[0])


def encode_text(
    pipe: StableDiffusion3InpaintPipeline, prompt: str, guidance_scale: float, max_sequence_length: int
) -> TextConditioning:
    """Encode `prompt` (and the empty negative prompt under guidance) exactly as `__call__` does."""
    guided = guidance_scale > 1
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=None,
        prompt_3=None,
        device=pipe._execution_device,
        do_classifier_free_guidance=guided,
        max_sequence_length=max_sequence_length,
    )
    if guided:
        prompt_embeds = torch.cat([negative_embeds, prompt_embeds], dim=0)
        pooled = torch.cat([negative_pooled, pooled], dim=0)
    return TextConditioning(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)


def prepare_timesteps(pipe: StableDiffusion3InpaintPipeline, height: int, width: int, steps: int) -> torch.Tensor:
    """Set the scheduler up exactly as `__call__` does with strength 1.0; return its timesteps."""
    device = pipe._execution_device
    config = pipe.scheduler.config
    scheduler_kwargs: dict[str, float] = {}
    if config.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        image_seq_len = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
        scheduler_kwargs["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    retrieve_timesteps(pipe.scheduler, steps, device, **scheduler_kwargs)
    timesteps, _ = pipe.get_timesteps(steps, 1.0, device)
    return timesteps


def latent_mask(pipe: StableDiffusion3InpaintPipeline, mask: Image.Image, dtype: torch.dtype) -> torch.Tensor:
    """Return the (1, 1, h, w) 0/1 latent mask the stock pipeline blends with, from a 0/255 `mask` image."""
    width, height = mask.size
    condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
    size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return F.interpolate(condition, size=size).to(device=pipe._execution_device, dtype=dtype)


@contextmanager
def masked_transformer(
    transformer: SD3Transformer2DModel,
    source: BlockCacheSource,
    layout: TokenLayout,
    cursor: StepCursor,
    variant: Variant = "kv",
) -> Iterator[None]:
    """Make transformer calls inside the `with` block run only text and masked image tokens through the blocks.

    Queries also attend to the K/V (of step `cursor.step`) of the unmasked tokens, cached or, for variant
    "hidden", computed from their cached hidden states. The output contains
    the masked tokens' predictions and zeros elsewhere. Processors and hooks are restored on exit.
    """
    masked = layout.masked.to(transformer.device)
    unmasked = layout.unmasked.to(transformer.device)

    def gather(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.index_select(1, masked)

    def scatter(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        full = output.new_zeros(output.shape[0], layout.num_tokens, output.shape[2])
        return full.index_copy_(1, masked, output)

    original = transformer.attn_processors
    transformer.set_attn_processor(
        {
            name: CachedJointAttnProcessor(layer, cursor, source, unmasked, variant)
            for layer, (name, _attn) in enumerate(attention_layers(transformer))
        }
    )
    hooks = [transformer.pos_embed.register_forward_hook(gather), transformer.proj_out.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        transformer.set_attn_processor(original)


def check_compatible(
    metadata: ActivationsMetadata,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> None:
    """Raise ValueError when cached activations were recorded with settings other than the request's."""
    if metadata.variant not in SD3Family.variants:
        raise ValueError(
            f"Cached variant {metadata.variant!r} is not supported by SD3; warm the template up with one of "
            f"{SD3Family.variants}."
        )
    expected = {
        "seed": (metadata.seed, seed),
        "steps": (metadata.num_steps, steps),
        "guidance_scale": (metadata.guidance_scale, float(guidance_scale)),
        "height": (metadata.height, height),
        "width": (metadata.width, width),
        "dtype": (metadata.dtype, dtype),
    }
    for name, (cached, requested) in expected.items():
        if cached != requested:
            raise ValueError(
                f"Request {name}={requested!r} does not match the cached activations ({cached!r}). "
                "Warm the template up again with the request's settings."
            )


def denoise_masked(
    pipe: StableDiffusion3InpaintPipeline,
    activations: TemplateActivations,
    mask: Image.Image,
    layout: TokenLayout,
    text: TextConditioning,
    *,
    block_source: BlockCacheSource | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise the tokens of `layout` under `mask` (0/255) and return the final latents (16, h, w).

    Reproduces the stock loop with strength 1.0: the initial latents are the cached initial noise, and after each
    step the stock blend puts the noised template latents (the cached trajectory) back where the latent mask is 0.
    `layout` must cover every token the latent mask touches (any `token_mask` of `mask` does).
    """
    in_channels = pipe.transformer.config.in_channels
    if in_channels != LATENT_CHANNELS:
        raise ValueError(
            f"Invalid transformer in_channels={in_channels}: masked SD3 edits support {LATENT_CHANNELS}-channel "
            "transformers, which the stock pipeline blends, not inpainting transformers with mask channels."
        )
    metadata = activations.metadata
    width, height = mask.size
    if (height, width) != (metadata.height, metadata.width) or layout.grid != metadata.grid:
        raise ValueError(
            f"Mask size {height}x{width} (token grid {layout.grid}) does not match the cached activations "
            f"({metadata.height}x{metadata.width}, grid {metadata.grid})."
        )
    trajectory = activations.latents
    dtype = text.prompt_embeds.dtype
    source = block_source if block_source is not None else InMemoryBlockCacheSource(activations)
    transformer = pipe.transformer
    guidance_scale = metadata.guidance_scale
    timesteps = prepare_timesteps(pipe, height, width, metadata.num_steps)
    blend = latent_mask(pipe, mask, dtype)
    cursor = StepCursor()

    latents = trajectory[0].unsqueeze(0).clone()
    with torch.inference_mode(), masked_transformer(transformer, source, layout, cursor, metadata.variant):
        for index, t in enumerate(timesteps):
            cursor.step = index
            model_input = torch.cat([latents] * text.batch)
            noise_pred = transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=text.prompt_embeds,
                pooled_projections=text.pooled_prompt_embeds,
                return_dict=False,
            )[0]
            if text.batch == 2:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            latents = (1 - blend) * trajectory[index + 1].unsqueeze(0) + blend * latents
            if on_step is not None:
                on_step(index + 1, metadata.num_steps)
    return latents[0]


def decode_latents(pipe: StableDiffusion3InpaintPipeline, latents: torch.Tensor) -> np.ndarray:
    """Decode final latents (16, h, w) to a uint8 (H, W, 3) image exactly as the stock inpaint pipeline does.

    The stock inpaint pipeline divides by the scaling factor and does not add the VAE shift factor back.
    """
    with torch.inference_mode():
        decoded = pipe.vae.decode(latents.unsqueeze(0) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    # Same rounding as VaeImageProcessor.numpy_to_pil, so the result equals the stock "pil" output.
    return (pixels * 255).round().astype(np.uint8)


# FLOPs --------------------------------------------------------------------------------------------------------


def transformer_flops(
    config: Any, *, text_tokens: int, image_tokens: int, queries: int, recomputed: int = 0
) -> float:
    """Return the FLOPs of one SD3Transformer2DModel forward pass per batch item (a multiply-add is 2 FLOPs).

    `queries` image tokens pass through the blocks (all of them in a stock pass); they attend to all
    `image_tokens` keys. Each attention layer also projects the K and V of `recomputed` more image tokens
    from cached hidden states (the "hidden" cache variant). Counted: linear layers, the patch embedding (always
    on every token) and attention (QK^T and AV). Not counted: norms, activations and softmax, which are linear in
    the token count and small.
    """
    d = config.num_attention_heads * config.attention_head_dim
    patch_channels = config.patch_size**2 * config.in_channels
    out_channels = config.patch_size**2 * (config.out_channels or config.in_channels)
    text, keys = text_tokens, text_tokens + image_tokens
    total = 2 * image_tokens * patch_channels * d
    total += 2 * (256 * d + d * d + config.pooled_projection_dim * d + d * d)  # timestep and pooled text embedders
    total += 2 * text * config.joint_attention_dim * config.caption_projection_dim
    for index in range(config.num_layers):
        context_pre_only = index == config.num_layers - 1
        dual = index in tuple(config.dual_attention_layers)
        # AdaLN modulation: 6 (9 with a second attention) image outputs, 6 (2 in the last block) text outputs.
        image_modulation = 9 if dual else 6
        text_modulation = 2 if context_pre_only else 6
        total += 2 * d * (image_modulation * d) + 2 * d * (text_modulation * d)
        total += 2 * (queries + text) * d * (3 * d)  # Q, K, V projections
        total += 2 * recomputed * d * (2 * d)  # K, V of unmasked tokens from cached hidden states
        total += 2 * 2 * (queries + text) * keys * d  # attention
        total += 2 * queries * d * d + 2 * 2 * queries * d * (4 * d)  # image output projection and MLP
        if not context_pre_only:
            total += 2 * text * d * d + 2 * 2 * text * d * (4 * d)  # text output projection and MLP
        if dual:
            total += 2 * queries * d * (4 * d) + 2 * 2 * queries * image_tokens * d  # image-only attention
            total += 2 * recomputed * d * (2 * d)
    total += 2 * d * (2 * d) + 2 * queries * d * out_channels  # output norm modulation and projection
    return float(total)


# Family -------------------------------------------------------------------------------------------------------


class SD3Family(ModelFamily):
    """Stable Diffusion 3: 16 latent channels, 2x2 patches, so one token covers 16x16 pixels; additive positions."""

    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[type] = StableDiffusion3InpaintPipeline
    variants: ClassVar[tuple[str, ...]] = ("kv", "hidden")

    def build_demo(self, folder: Path, preset: str, *, seed: int = 0) -> None:
        build_sd3_demo(folder, preset=preset, seed=seed)

    def working_multiple(self, pipe: Any) -> int:
        return self.pixels_per_token(pipe)

    def pixels_per_token(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * pipe.transformer.config.patch_size)

    def native_resolution(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        return int(pipe.tokenizer_max_length + max_sequence_length)

    def flop_fraction(
        self, pipe: Any, *, height: int, width: int, token_mask: np.ndarray, text_tokens: int, variant: str
    ) -> float:
        if variant not in self.variants:
            raise ValueError(f"variant must be one of {self.variants}, got {variant!r}.")
        tokens = np.asarray(token_mask, dtype=bool)
        config = pipe.transformer.config
        full = transformer_flops(config, text_tokens=text_tokens, image_tokens=tokens.size, queries=tokens.size)
        queries = int(tokens.sum())
        recomputed = tokens.size - queries if variant == "hidden" else 0
        masked = transformer_flops(
            config, text_tokens=text_tokens, image_tokens=tokens.size, queries=queries, recomputed=recomputed
        )
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
        def step_end(pipeline: Any, step: int, _t: torch.Tensor, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, pipeline.num_timesteps)
            return callback_kwargs

        width, height = image.size
        with torch.inference_mode():
            output = pipe(
                prompt=prompt,
                image=image.convert("RGB"),
                mask_image=mask,
                height=height,
                width=width,
                strength=1.0,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                # Seeding a CPU generator gives the same noise on every device for the same seed.
                generator=torch.Generator(device="cpu").manual_seed(seed),
                max_sequence_length=max_sequence_length,
                callback_on_step_end=step_end,
            )
        return np.asarray(output.images[0].convert("RGB"), dtype=np.uint8)

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
        if variant not in self.variants:
            raise ValueError(f"variant must be one of {self.variants}, got {variant!r}.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        template = to_pil_image(image)
        activations = record_activations(
            pipe,
            template,
            Image.new("L", template.size, 0),
            prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            variant=variant,
            on_progress=on_progress,
        )
        logger.info(
            "Recorded SD3 activations: %d steps x %d layers, %d image tokens, %.1f MiB",
            steps,
            activations.metadata.num_blocks,
            activations.metadata.num_image_tokens,
            activations.nbytes / 2**20,
        )
        return activations

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
        """Edit as `ModelFamily.masked_edit` describes. `image` must be the template the activations were recorded on.

        With strength 1.0 the stock pipeline uses the image only through its VAE latents under the seed, which
        are the warm-up's final latents, so the image is not encoded again.
        """
        template = to_pil_image(image)
        width, height = template.size
        check_compatible(
            activations.metadata,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            dtype=pipe.transformer.dtype,
        )
        pixel_mask = np.asarray(mask, dtype=bool)
        layout = TokenLayout.from_pixel_mask(pixel_mask, patch=self.pixels_per_token(pipe), dilation=dilation)
        with torch.inference_mode():
            text = encode_text(pipe, prompt, guidance_scale, max_sequence_length)
        latents = denoise_masked(pipe, activations, mask_to_pil(pixel_mask), layout, text, on_step=on_step)
        logger.debug("SD3 masked edit recomputed %d of %d tokens", layout.num_masked, layout.num_tokens)
        return MaskedOutput(generated=decode_latents(pipe, latents), latents=latents)
