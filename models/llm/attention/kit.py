"""The attention kit HyperAttention and HiP share: exact attention that also returns the log-sum-exp of
each query's scores, the log-sum-exp merge of two partial attentions, and the glue that registers a
function with transformers' `AttentionInterface`.

Why the lse: attention over a key set S is o_S = Σ_{j∈S} e^{s_j} v_j / Z_S with lse_S = log Z_S. For
disjoint S₁, S₂, Z_{S₁∪S₂} = Z_{S₁} + Z_{S₂}, so

    lse = logaddexp(lse₁, lse₂),   o = e^{lse₁−lse} o₁ + e^{lse₂−lse} o₂

is *exact* attention over the union (HyperAttention, Han et al. 2023, Alg. 1 line 6 / Alg. 4's merge, which
writes the same thing as c = σ(lse₁ − lse₂), o = c·o₁ + (1−c)·o₂). A query that sees no key in a set has
lse = −inf and o = 0, and then simply drops out of the merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NEG_INF = float("-inf")


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention and its lse: q [..., n, d], k/v [..., m, d], `bias` broadcastable to [..., n, m]
    (0 or −inf). `causal` aligns the queries to the *last* n keys (prefill n = m; a continued chunk n < m).
    Rows with no visible key give o = 0, lse = −inf. Computed in float32 (float64 stays float64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1)
        scores = scores.masked_fill(future, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(weights, v.to(dtype))
    return out.to(q.dtype), lse


def merge_lse(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the partial results (module docstring)."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    dtype = torch.promote_types(o1.dtype, torch.float32)
    w2 = torch.exp(lse2 - safe).nan_to_num(0.0).unsqueeze(-1).to(dtype)  # e^{lse₂−lse} = 1 − e^{lse₁−lse}
    return torch.lerp(o1.to(dtype), o2.to(dtype), w2).to(o1.dtype), lse  # one pass: o₁ + w₂·(o₂ − o₁)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., n, d], index [..., m] (the same leading dims, entries in [0, n)) → [..., m, d]: rows picked by one
    `index_select` over the flattened rows (`torch.gather` with an index expanded over d is several times
    slower on CPU)."""
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    offsets = torch.arange(index[..., 0].numel(), device=x.device).view(*lead, 1) * n
    rows = x.reshape(-1, d).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*index.shape, d)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, d] → [B, H_kv·groups, T, d] (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, Any], torch.Tensor]


def interface_function(
    prefill: PrefillFn, use_for_layer: Callable[[Any], bool]
) -> Callable[..., tuple[torch.Tensor, None]]:
    """An `AttentionInterface` function: `prefill(q, k, v, scale, module)` (causal, q [B, H, n, d], n = m) for the
    layers `use_for_layer(module)` accepts; every other call — decoding steps (n < m), other layers, and batches
    with a padding mask (the mask interface is SDPA's, which gives None for a plain causal batch) — is exact SDPA,
    so the cache and generation loop are unchanged (prefill is approximated, decoding stays exact)."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:  # transformers' order: kvpress passes dropout 6th
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        n, m = query.shape[-2], key.shape[-2]
        if attention_mask is None and n == m and use_for_layer(module):
            out = prefill(query, key, value, scale, module)
        elif attention_mask is None:
            out = (
                F.scaled_dot_product_attention(query, key, value, scale=scale, is_causal=n > 1, enable_gqa=False)
                if n == m or n == 1
                else attention_with_lse(query, key, value, scale, causal=True)[0]
            )
        else:
            mask = attention_mask[..., : key.shape[-2]]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous(), None

    return attention


def last_layers_filter(last_layers: int | None) -> Callable[[Any], bool]:
    """`use_for_layer` for `interface_function`: every layer (None), or only the last ℓ decoder layers."""

    def use_for_layer(module: Any) -> bool:
        if last_layers is None:
            return True
        total = getattr(getattr(module, "config", None), "num_hidden_layers", 0)
        return getattr(module, "layer_idx", 0) >= total - last_layers

    return use_for_layer


_PREFILL_PATHS: dict[str, str] = {}


def record_prefill_path(name: str, path: str) -> None:
    """Note which path (e.g. "flex" or "gather") the attention registered as `name` took in its last prefill."""
    _PREFILL_PATHS[name] = path


def prefill_path(name: str, clear: bool = False) -> str | None:
    """The path of the last prefill through the attention registered as `name` (None: none since it was cleared);
    `clear` forgets it, so that a caller can tell what its own prefills did."""
    return _PREFILL_PATHS.pop(name, None) if clear else _PREFILL_PATHS.get(name)


def register_attention(name: str, fn: Callable[..., tuple[torch.Tensor, None]]) -> str:
    """Register `fn` under `name` with transformers (attention and SDPA's mask builder), so
    `model.set_attn_implementation(name)` — or `attn_implementation=name` at load time — selects it."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
