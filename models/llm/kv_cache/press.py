"""Compressing a `CompressedCache` at prefill: the forward hook, the prefill attention it scores with, budgets.

The hook follows kvpress's design (`BasePress.forward_hook`: after each attention layer's forward, on the initial
prefill only, read that layer's keys and values from the cache, compress them, write them back), rewritten for
transformers 5.24, whose attention modules receive `cache` and `position_embeddings` and no `cache_position`
(kvpress 0.5 reads `past_key_values` / `cache_position` and so cannot hook this version). A press is any object with
`compress(module, keys, values, attention) -> Compressed`; `attention` is the layer's causal softmax over the
prompt, [B, H_q, T, T], recomputed from the layer's input when `press.needs_attention` (the scores EMS, SnapKV and
H2O use), else None. A press that also sets `needs_queries` (ThinK's channel scores) is called with the prompt's
post-RoPE queries [B, H_q, T, d] as the keyword `queries`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from models.llm.kv_cache.cache import CompressedLayer


@dataclass
class Compressed:
    """A layer's compressed slots: keys/values [B, H_kv, S, ·] and, for head-wise variable lengths, valid [B, H_kv, S].
    `key_channels`: how many key channels per head carry information when a press zeroed the others in the first
    `narrow_slots` slots (ThinK); the cache stores them zeroed, so attention is unchanged, and counts only the kept
    ones as bytes."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None = None
    key_channels: int | None = None
    narrow_slots: int | None = None  # how many leading slots are channel-pruned (None: all)


class Press(Protocol):
    needs_attention: bool

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed: ...


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def prefill_queries(
    module: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The layer's post-RoPE queries [B, H_q, T, d] recomputed from its input (Llama-style q_proj)."""
    b, t, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(b, t, -1, module.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def prefill_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Causal softmax attention of the prompt over itself, [B, H_q, T, T], in float32."""
    q = prefill_queries(module, hidden_states, position_embeddings).float()
    groups = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = scores.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def _hook(press: Press):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if cache is None or module.layer_idx >= len(cache.layers):
            return output
        layer = cache.layers[module.layer_idx]
        if not isinstance(layer, CompressedLayer) or layer.compressed or layer.seen != hidden.shape[1]:
            return output  # only the initial prefill is compressed (as kvpress); later chunks and decoding append
        attention = (
            prefill_attention(module, hidden, layer.keys, kwargs["position_embeddings"])
            if press.needs_attention
            else None
        )
        extra = (
            {"queries": prefill_queries(module, hidden, kwargs["position_embeddings"])}
            if getattr(press, "needs_queries", False)
            else {}
        )
        result = press.compress(module, layer.keys, layer.values, attention, **extra)
        layer.replace(result.keys, result.values, result.valid, result.key_channels, result.narrow_slots)
        return output

    return hook


def attention_layers(model: nn.Module) -> list[nn.Module]:
    inner = model.model if hasattr(model, "model") else model
    return [layer.self_attn for layer in inner.layers]


@contextmanager
def compressing(model: nn.Module, press: Press | None) -> Iterator[None]:
    """Within the block, a forward that prefills a `CompressedCache` compresses it with `press` (None: no-op)."""
    if press is None:
        yield
        return
    handles = [attn.register_forward_hook(_hook(press), with_kwargs=True) for attn in attention_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] at per-head token indices [B, H, S] → [B, H, S, d]."""
    return x.gather(2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))
