"""NASA: negative-away steer attention (Nguyen et al., "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance", 2024, §4 Eq. 10) as a diffusers attention processor.

In every cross-attention layer the negative prompt's attention output is subtracted from the
positive one, with the layer's own W_q, W_k, W_v and before the output projection:

    Z = softmax(Q K₊ᵀ/√d) V₊ − α · softmax(Q K₋ᵀ/√d) V₋

It needs no unconditional branch, so it works for one-step models where CFG cannot. α = 0 gives
the stock processor's output exactly; a negative prompt equal to the positive one gives (1 − α)·Z₊.
The paper's inference α: 0.1 (SD1.5), 0.2 (SD2.1), 0.5 (PixArt-α). Installed per request through
`models.diffusion.sampling.ATTENTION_PROCESSORS["nasa"]` on the `attn2` (cross-attention) layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

DEFAULT_ALPHA = 0.5


def attend(attn: Attention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ/√d) V for an already projected query [B, H, L, d] and a context [B, S, D] → [B, L, H·d]."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    b, heads = query.shape[0], attn.heads
    key = attn.to_k(context).view(b, -1, heads, query.shape[-1]).transpose(1, 2)
    value = attn.to_v(context).view(b, -1, heads, query.shape[-1]).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * query.shape[-1])


def nasa_attention(
    attn: Attention, hidden_states: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Z = Z₊ − α·Z₋ for tokens [B, L, C] (before the output projection)."""
    b = hidden_states.shape[0]
    inner = attn.to_q.out_features
    query = attn.to_q(hidden_states).view(b, -1, attn.heads, inner // attn.heads).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    z_pos = attend(attn, query, positive)
    return z_pos if alpha == 0 else z_pos - alpha * attend(attn, query, negative.expand(b, -1, -1))


class NASAProcessor:
    """Cross-attention processor holding one request's negative-prompt embedding [1 or B, S, D] and α."""

    def __init__(self, negative: torch.Tensor, alpha: float = DEFAULT_ALPHA):
        self.negative = negative
        self.alpha = float(alpha)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("NASA acts on cross-attention layers only (attn2)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = nasa_attention(
            attn, hidden_states, encoder_hidden_states, self.negative.to(hidden_states.dtype), self.alpha
        )
        out = attn.to_out[1](attn.to_out[0](out.to(hidden_states.dtype)))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(*shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
