"""Attention processors that record or reuse image-token activations of FluxTransformer2DModel.

They replace the stock `FluxAttnProcessor` through `set_attn_processor`, so the model classes and checkpoints
stay unchanged. Both compute exactly what the stock processor computes for the tokens they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from workers.masked.activations import BlockActivations, BlockCacheSource, Variant

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepCursor:
    """Denoising step index shared by all processors of one run; the denoising loop advances it."""

    step: int = 0


@dataclass
class ActivationRecorder:
    """Collects BlockActivations per step and block during the warm-up run."""

    variant: Variant
    num_steps: int
    num_blocks: int
    num_image_tokens: int
    blocks: list[list[BlockActivations | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.blocks = [[None] * self.num_blocks for _ in range(self.num_steps)]

    def store(self, step: int, block: int, entry: BlockActivations) -> None:
        if step >= self.num_steps:
            raise ValueError(f"Recorded step {step} is out of range; the warm-up has {self.num_steps} steps.")
        self.blocks[step][block] = entry


def _project(
    attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return query, key, value of shape (B, S, heads, head_dim) after QK norms, text tokens first."""
    query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
    key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
    value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    return query, key, value


def _output(
    attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply the output projections to attention output (B, S, D) as the stock processor does."""
    if encoder_hidden_states is None:
        return hidden_states
    text_len = encoder_hidden_states.shape[1]
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [text_len, hidden_states.shape[1] - text_len], dim=1
    )
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
    return hidden_states, encoder_hidden_states


class RecordingFluxAttnProcessor:
    """Stock Flux attention that also stores the image tokens' K/V or normalized hidden states.

    Image tokens are the last `num_image_tokens` positions: double-stream blocks pass image tokens only as
    `hidden_states`, and single-stream blocks pass the text tokens first.
    """

    def __init__(self, block: int, cursor: StepCursor, recorder: ActivationRecorder) -> None:
        self.block = block
        self.cursor = cursor
        self.recorder = recorder

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: RotaryEmbedding | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        num_image = self.recorder.num_image_tokens
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.recorder.variant == "kv":
            # (1, N_img, heads, head_dim) -> (heads, N_img, head_dim), the layout SDPA reads keys in.
            entry = BlockActivations(
                k=key[0, -num_image:].transpose(0, 1).contiguous(),
                v=value[0, -num_image:].transpose(0, 1).contiguous(),
            )
        else:
            entry = BlockActivations(hidden=hidden_states[0, -num_image:].clone())
        self.recorder.store(self.cursor.step, self.block, entry)

        attended = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        attended = attended.flatten(2, 3).to(query.dtype)
        return _output(attn, attended, encoder_hidden_states)


@dataclass(frozen=True)
class UnmaskedTokens:
    """Positions of the unmasked image tokens, and their rotary embedding for the "hidden" variant."""

    indices: torch.Tensor
    rotary: RotaryEmbedding | None


class CachedFluxAttnProcessor:
    """Flux attention whose queries attend to fresh K/V plus the cached K/V of unmasked image tokens.

    The block receives text tokens and masked image tokens only. Attention is permutation invariant over keys,
    so the cached keys are appended after the fresh ones.
    """

    def __init__(
        self,
        block: int,
        cursor: StepCursor,
        source: BlockCacheSource,
        variant: Variant,
        unmasked: UnmaskedTokens,
    ) -> None:
        if variant == "hidden" and unmasked.rotary is None:
            raise ValueError("Missing UnmaskedTokens.rotary: variant='hidden' needs the unmasked tokens' rotary embedding.")
        self.block = block
        self.cursor = cursor
        self.source = source
        self.variant = variant
        self.unmasked = unmasked
        # Keys and values (1, tokens, heads, head_dim) of tokens that attend nowhere in this call but are
        # attended to, set before the call (see `workers.masked.text_keys`) and used once.
        self.extra_keys: tuple[torch.Tensor, torch.Tensor] | None = None
        # Keys and values of one call, (1, heads, S_fresh + N_unmasked, head_dim), reused across steps because
        # allocating and concatenating them anew on every call costs more than the copies themselves.
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _buffers(self, fresh_key: torch.Tensor, extra_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, fresh_tokens, heads, head_dim = fresh_key.shape
        shape = (batch, heads, fresh_tokens + extra_tokens + self.unmasked.indices.numel(), head_dim)
        if self._key_buffer is None or self._key_buffer.shape != shape or self._key_buffer.dtype != fresh_key.dtype:
            self._key_buffer = fresh_key.new_empty(shape)
            self._value_buffer = fresh_key.new_empty(shape)
        assert self._value_buffer is not None
        return self._key_buffer, self._value_buffer

    def _fill_cached(self, attn: FluxAttention, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Write the cached unmasked keys and values into `key_cache` and `value_cache`, (heads, N_unmasked, head_dim)."""
        entry = self.source.get(self.cursor.step, self.block)
        indices = self.unmasked.indices
        if self.variant == "kv":
            if entry.k is None or entry.v is None:
                raise ValueError(f"Cached block {self.block} at step {self.cursor.step} has no K/V tensors.")
            torch.index_select(entry.k, 1, indices, out=key_cache)
            torch.index_select(entry.v, 1, indices, out=value_cache)
            return

        if entry.hidden is None:
            raise ValueError(f"Cached block {self.block} at step {self.cursor.step} has no hidden states.")
        hidden = entry.hidden.index_select(0, indices).unsqueeze(0)
        key = attn.norm_k(attn.to_k(hidden).unflatten(-1, (-1, attn.head_dim)))
        value = attn.to_v(hidden).unflatten(-1, (-1, attn.head_dim))
        assert self.unmasked.rotary is not None
        key = apply_rotary_emb(key, self.unmasked.rotary, sequence_dim=1)
        key_cache.copy_(key[0].transpose(0, 1))
        value_cache.copy_(value[0].transpose(0, 1))

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: RotaryEmbedding | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CachedFluxAttnProcessor does not support attention_mask. Pass attention_mask=None.")
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if key.shape[0] != 1:
            raise ValueError(f"CachedFluxAttnProcessor supports batch size 1 only, got {key.shape[0]}. Run one request at a time.")
        # Keys and values in (1, heads, tokens, head_dim): fresh text and masked tokens, the extra keys, then
        # the cached unmasked tokens.
        extra, self.extra_keys = self.extra_keys, None
        fresh_tokens = key.shape[1]
        end = fresh_tokens + (0 if extra is None else extra[0].shape[1])
        key_buffer, value_buffer = self._buffers(key, end - fresh_tokens)
        key_buffer[:, :, :fresh_tokens].copy_(key.transpose(1, 2))
        value_buffer[:, :, :fresh_tokens].copy_(value.transpose(1, 2))
        if extra is not None:
            key_buffer[:, :, fresh_tokens:end].copy_(extra[0].transpose(1, 2))
            value_buffer[:, :, fresh_tokens:end].copy_(extra[1].transpose(1, 2))
        self._fill_cached(attn, key_buffer[0, :, end:], value_buffer[0, :, end:])

        attended = F.scaled_dot_product_attention(query.transpose(1, 2), key_buffer, value_buffer)
        attended = attended.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return _output(attn, attended, encoder_hidden_states)
