"""Attention processor for packed batches: each request attends only to its own tokens and its own cache.

The block hands over tokens with one token per batch row, (N, 1, D), and the processor projects them as the
stock processor does. It then regroups each request's text and masked image tokens into one sequence. That
sequence attends to the request's fresh K/V plus the cached K/V of its unmasked tokens for its own step and block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from workers.engine.packing import PackedStep
from workers.engine.state import RequestState
from workers.masked.processors import RotaryEmbedding


class CacheLookupError(Exception):
    """Failure of one request's cache source, carrying the request id so the engine retires only that request."""

    def __init__(self, request_id: int, step: int, block: int) -> None:
        super().__init__(f"Cached activations of step {step}, block {block} are unavailable for request {request_id}.")
        self.request_id = request_id


def _heads(attn: FluxAttention, projected: torch.Tensor) -> torch.Tensor:
    """Reshape projected tokens (N, 1, H * head_dim) to (N, H, head_dim)."""
    return projected[:, 0].unflatten(-1, (-1, attn.head_dim))


def _project_packed(
    attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return joint query, key, value of shape (N_joint, H, head_dim) after QK norms, text rows first."""
    query = attn.norm_q(_heads(attn, attn.to_q(hidden_states)))
    key = attn.norm_k(_heads(attn, attn.to_k(hidden_states)))
    value = _heads(attn, attn.to_v(hidden_states))
    if encoder_hidden_states is not None:
        text_query = attn.norm_added_q(_heads(attn, attn.add_q_proj(encoder_hidden_states)))
        text_key = attn.norm_added_k(_heads(attn, attn.add_k_proj(encoder_hidden_states)))
        text_value = _heads(attn, attn.add_v_proj(encoder_hidden_states))
        query = torch.cat((text_query, query))
        key = torch.cat((text_key, key))
        value = torch.cat((text_value, value))
    return query, key, value


def _rotate(tokens: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """Apply each row's rotary embedding to (N, H, head_dim), viewed as one sequence of N tokens."""
    return apply_rotary_emb(tokens.unsqueeze(0), rotary, sequence_dim=1)[0]


def fill_cached_key_value(
    attn: FluxAttention, state: RequestState, step: int, block: int, key_out: torch.Tensor, value_out: torch.Tensor
) -> None:
    """Write the request's cached unmasked keys and values of `step` and `block` into the given views.

    `key_out` and `value_out` have shape (H, N_unmasked, head_dim).
    """
    try:
        entry = state.source.get(step, block)
    except Exception as error:
        raise CacheLookupError(state.handle.request_id, step, block) from error
    if state.variant == "kv":
        if entry.k is None or entry.v is None:
            raise CacheLookupError(state.handle.request_id, step, block)
        torch.index_select(entry.k, 1, state.unmasked, out=key_out)
        torch.index_select(entry.v, 1, state.unmasked, out=value_out)
        return

    if entry.hidden is None:
        raise CacheLookupError(state.handle.request_id, step, block)
    assert state.unmasked_rotary is not None
    hidden = entry.hidden.index_select(0, state.unmasked)
    key = attn.norm_k(attn.to_k(hidden).unflatten(-1, (-1, attn.head_dim)))
    value = attn.to_v(hidden).unflatten(-1, (-1, attn.head_dim))
    key_out.copy_(_rotate(key, state.unmasked_rotary).transpose(0, 1))
    value_out.copy_(value.transpose(0, 1))


class PackedFluxAttnProcessor:
    """Flux attention over a packed batch: one processor per block, created for one transformer pass."""

    def __init__(self, block: int, packed: PackedStep) -> None:
        self.block = block
        self.packed = packed

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: RotaryEmbedding | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError(
                "PackedFluxAttnProcessor does not support attention_mask. Pass attention_mask=None: packing keeps "
                "requests apart."
            )
        if image_rotary_emb is None:
            raise ValueError(
                "Missing image_rotary_emb: PackedFluxAttnProcessor needs the rotary embedding of every packed token."
            )
        query, key, value = _project_packed(attn, hidden_states, encoder_hidden_states)
        query = _rotate(query, image_rotary_emb)
        key = _rotate(key, image_rotary_emb)

        layout = self.packed.layout
        tokens, heads, head_dim = query.shape
        attended = query.new_empty(tokens, heads * head_dim)
        for state, span, step in zip(layout.states, layout.spans, self.packed.steps):
            rows = span.joint_rows
            fresh = rows.numel()
            # (H, S, head_dim): the request's fresh text and masked tokens, then its cached unmasked tokens.
            shape = (heads, fresh + state.unmasked.numel(), head_dim)
            request_key = key.new_empty(shape)
            request_value = value.new_empty(shape)
            request_key[:, :fresh].copy_(key.index_select(0, rows).transpose(0, 1))
            request_value[:, :fresh].copy_(value.index_select(0, rows).transpose(0, 1))
            fill_cached_key_value(attn, state, step, self.block, request_key[:, fresh:], request_value[:, fresh:])
            request_query = query.index_select(0, rows).transpose(0, 1)
            output = F.scaled_dot_product_attention(
                request_query.unsqueeze(0), request_key.unsqueeze(0), request_value.unsqueeze(0)
            )
            attended.index_copy_(0, rows, output[0].transpose(0, 1).flatten(1, 2).to(query.dtype))

        attended = attended.unsqueeze(1)
        if encoder_hidden_states is None:
            return attended
        text_rows = encoder_hidden_states.shape[0]
        image_output = attn.to_out[1](attn.to_out[0](attended[text_rows:]))
        text_output = attn.to_add_out(attended[:text_rows])
        return image_output, text_output
