"""HiP attention (Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
Pruning", 2024), our own torch implementation written from the paper's description (the reference code's
licence forbids reuse; it was not read).

Per head and per block of b_q queries, keys are grouped in blocks of b_k and K_b = k / b_k key blocks survive:

1. **Tree-search mask.** Start with K_b branches that tile the query block's causal key blocks [0, n_i).
   Repeat until every branch is one key block (≈ log₂(n_i / K_b) rounds): halve every branch, score each
   half by the largest q·k between the query block and the half's representative (centre) key block, keep
   the K_b best halves. The result is K_b distinct causal key blocks per query block, found with
   O(K_b·b_q·b_k·d) work per round instead of scoring all T keys (the mask is O(T log T)).
2. **Block-sparse attention** of each query over the union of the selected blocks, the first `sink` tokens
   and a window of the `window` tokens before its query block plus the block itself (causal within it), so
   attention is O(T·(k + sink + window + b_q)).

With k ≥ T every causal block is selected and the result is exact causal attention (a unit test); with k = 0
only sink and window remain — StreamingLLM's key set (Xiao et al. 2023), which the reproduction uses as the
baseline at the same number of keys. Decoding steps stay exact (the paper's reuse of one mask across several decoding
steps is not implemented): the `AttentionInterface` function approximates prefill only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.llm.attention.kit import attention_with_lse, interface_function, last_layers_filter, register_attention

NEG_INF = float("-inf")


@dataclass(frozen=True)
class HiPConfig:
    top_k: int = 512  # k: keys kept by the tree search (K_b = k // block_k blocks)
    block_q: int = 64  # b_q
    block_k: int = 2  # b_k
    window: int = 256  # tokens before each query block always attended
    sink: int = 16  # first tokens always attended
    last_layers: int | None = None  # patch only the last ℓ decoder layers (None: all)

    @property
    def key_blocks(self) -> int:
        return self.top_k // self.block_k


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[..., T, d] → [..., ceil(T/size), size, d], zero-padded."""
    t = x.shape[-2]
    n = math.ceil(t / size)
    if n * size > t:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], n * size - t, x.shape[-1])], dim=-2)
    return x.reshape(*x.shape[:-2], n, size, x.shape[-1])


def causal_block_counts(t: int, config: HiPConfig, device: torch.device | None = None) -> torch.Tensor:
    """n_i: the number of key blocks holding a key at or before query block i's last query."""
    ends = torch.clamp((torch.arange(math.ceil(t / config.block_q), device=device) + 1) * config.block_q, max=t)
    return torch.div(ends + config.block_k - 1, config.block_k, rounding_mode="floor")


@torch.no_grad()
def tree_search(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """Selected key blocks [B, H, n_q, K_b] per query block (−1 where a query block has fewer than K_b causal
    blocks); step 1 of the module docstring."""
    kb = config.key_blocks
    t = q.shape[-2]
    q_blocks, k_blocks = _blocks(q.float(), config.block_q), _blocks(k.float(), config.block_k)
    lead, n_q = q.shape[:-2], q_blocks.shape[-3]
    if kb == 0:
        return torch.full((*lead, n_q, 0), -1, dtype=torch.long, device=q.device)
    n_i = causal_block_counts(t, config, q.device).view(n_q, 1)
    j = torch.arange(kb, device=q.device)
    lo = (j * n_i).div(kb, rounding_mode="floor").expand(*lead, n_q, kb).contiguous()
    hi = ((j + 1) * n_i).div(kb, rounding_mode="floor").expand(*lead, n_q, kb).contiguous()
    while (hi - lo).max() > 1:
        mid = lo + (hi - lo + 1) // 2
        cand_lo, cand_hi = torch.cat([lo, mid], dim=-1), torch.cat([mid, hi], dim=-1)
        representative = ((cand_lo + cand_hi - 1) // 2).clamp(min=0)  # centre block of each half
        keys = torch.gather(
            k_blocks.unsqueeze(-4).expand(*lead, n_q, *k_blocks.shape[-3:]),
            -3,
            representative[..., None, None].expand(*representative.shape, *k_blocks.shape[-2:]),
        )
        # max over the b_q × b_k dot products of the query block and the representative block
        score = torch.einsum("...qd,...ckd->...cqk", q_blocks, keys).amax(dim=(-1, -2))
        score = score.masked_fill(cand_hi <= cand_lo, NEG_INF)
        keep = score.topk(kb, dim=-1).indices
        lo, hi = torch.gather(cand_lo, -1, keep), torch.gather(cand_hi, -1, keep)
    return torch.where(hi > lo, lo, -1)


def key_sets(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each query attends: indices [B, H, n_q, L] per query block and a mask [B, H, n_q, b_q, L]
    (selected blocks ∪ sink ∪ window, causal, each key once)."""
    t, device = q.shape[-2], q.device
    blocks = tree_search(q, k, config)
    lead, n_q = blocks.shape[:-2], blocks.shape[-2]
    offsets = torch.arange(config.block_k, device=device)
    selected = torch.where(blocks.unsqueeze(-1) >= 0, blocks.unsqueeze(-1) * config.block_k + offsets, -1)
    starts = torch.arange(n_q, device=device) * config.block_q
    window = starts.view(n_q, 1) + torch.arange(-config.window, config.block_q, device=device)
    sink = torch.arange(config.sink, device=device).expand(n_q, config.sink)
    index = torch.cat(
        [selected.flatten(-2), sink.expand(*lead, n_q, config.sink), window.expand(*lead, n_q, window.shape[-1])],
        dim=-1,
    )
    index = torch.where((index >= 0) & (index < t), index, -1).sort(dim=-1).values
    duplicate = torch.cat([torch.zeros_like(index[..., :1], dtype=torch.bool), index[..., 1:] == index[..., :-1]], -1)
    valid = (index >= 0) & ~duplicate
    positions = starts.view(n_q, 1) + torch.arange(config.block_q, device=device)  # [n_q, b_q]
    allowed = valid.unsqueeze(-2) & (index.unsqueeze(-2) <= positions.unsqueeze(-1))
    return index, allowed


def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HiPConfig) -> torch.Tensor:
    """Causal HiP attention (step 2): q, k, v [B, H, T, d] → [B, H, T, d]."""
    t, d_v = q.shape[-2], v.shape[-1]
    index, allowed = key_sets(q, k, config)
    lead, n_q, width = index.shape[:-2], index.shape[-2], index.shape[-1]
    flat = index.clamp(min=0).reshape(*lead, n_q * width)
    keys = torch.gather(k, -2, flat.unsqueeze(-1).expand(*flat.shape, k.shape[-1])).reshape(*lead, n_q, width, -1)
    values = torch.gather(v, -2, flat.unsqueeze(-1).expand(*flat.shape, d_v)).reshape(*lead, n_q, width, d_v)
    bias = torch.zeros(allowed.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    out, _ = attention_with_lse(
        _blocks(q, config.block_q), keys, values, scale, bias=bias.masked_fill(~allowed, NEG_INF)
    )
    return out.reshape(*lead, n_q * config.block_q, d_v)[..., :t, :]


def register_hip(config: HiPConfig = HiPConfig(), name: str = "hip") -> str:
    """Register HiP with transformers' `AttentionInterface` under `name` (prefill of the chosen layers; decoding
    and padded batches stay exact): `model.set_attn_implementation(name)`."""

    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, module: Any) -> torch.Tensor:
        return hip_attention(q, k, v, scale, config)

    return register_attention(name, interface_function(prefill, last_layers_filter(config.last_layers)))


DEFAULT_NAME = register_hip()
