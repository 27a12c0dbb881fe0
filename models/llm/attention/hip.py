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

**Cost on CPU.** A search round scores each query block against the representatives of its 2·K_b candidate
halves, T·2k·d multiply-adds, over ≈ log₂(T / 3k) rounds on average; dense causal attention costs T²·d and step 2
T·2L·d (L = k + sink + window + b_q keys per query). At equal arithmetic speed the search alone saves
T / (2k·log₂(T / 3k)) — ≈ 4.7× at 16k tokens for the reference code's k = 512, so ≈ 3.2× with step 2 — and far
more for small k (k = 32: ≈ 35×). Each round is one batched matmul over every head and query block, and only
the query blocks whose branches are still wider than one block take part (`search_rounds`). Step 2 runs on FlexAttention
(`models/llm/attention/flex.py`): HiP's key blocks are 2 tokens wide, far below the width at which a BlockMask in
sequence coordinates pays off, so each query block's keys are gathered into one tile (`hip_tiles`) and the
mask_mod keeps the selected, causal ones — memory T·L/b_q keys per head for L = k + sink + window + b_q, never
T². The pure-torch path (`hip_attention_gather`) stays for float64 and autograd and is what the FlexAttention
path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.llm.attention import flex
from models.llm.attention.flex import NEVER, tile_attention, tile_width
from models.llm.attention.kit import (
    attention_with_lse,
    interface_function,
    last_layers_filter,
    record_prefill_path,
    register_attention,
)

NEG_INF = float("-inf")
SEARCH_CHUNK_BYTES = 4 << 20  # gathered representative keys + their scores held at once by one search round


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


def search_rounds(t: int, config: HiPConfig) -> torch.Tensor:
    """R_i: the halving rounds query block i needs before every branch is one key block. The initial branches hold
    ⌊n_i / K_b⌋ or ⌈n_i / K_b⌉ blocks and a round leaves at most ⌈s / 2⌉ of s, so R_i = ⌈log₂ ⌈n_i / K_b⌉⌉; a
    further round keeps every one-block branch (there are at most K_b of them) and changes nothing."""
    widest = torch.div(causal_block_counts(t, config) + config.key_blocks - 1, config.key_blocks, rounding_mode="floor")
    return torch.ceil(torch.log2(widest.clamp(min=1).double())).long()


def _branch_scores(
    q_blocks: torch.Tensor, k_flat: torch.Tensor, representative: torch.Tensor, n_keys: int, block_k: int
) -> torch.Tensor:
    """max over the b_q × b_k dot products of each query block and each branch's representative key block:
    q_blocks [BH, n, b_q, d], k_flat [BH·n_k, b_k·d], representative [BH, n, C] → [BH, n, C]. One batched
    matmul over every head and query block; the key blocks are fetched by row index (`index_select`), so no
    index tensor the size of the keys is built. Chunked over query blocks to hold `SEARCH_CHUNK_BYTES`."""
    bh, n, b_q, d = q_blocks.shape
    c = representative.shape[-1]
    rows = representative + (torch.arange(bh, device=representative.device) * n_keys).view(bh, 1, 1)
    per_block = bh * c * block_k * (d + b_q) * 4
    step = max(1, SEARCH_CHUNK_BYTES // max(per_block, 1))
    out = []
    for s in range(0, n, step):
        e = min(n, s + step)
        keys = k_flat.index_select(0, rows[:, s:e].reshape(-1)).view(bh * (e - s), c * block_k, d)
        scores = torch.bmm(q_blocks[:, s:e].reshape(-1, b_q, d), keys.transpose(1, 2))
        out.append(scores.amax(1).view(bh, e - s, c, block_k).amax(-1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def tree_search(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """Selected key blocks [B, H, n_q, K_b] per query block (−1 where a query block has fewer than K_b causal
    blocks); step 1 of the module docstring, vectorised over batch, heads and query blocks: each round is one
    batched matmul and one top-k over all of them, and only the query blocks that still hold a branch wider than
    one block (a suffix, since n_i grows with i; `search_rounds`) take part."""
    kb = config.key_blocks
    t = q.shape[-2]
    lead = q.shape[:-2]
    q_blocks, k_blocks = _blocks(q.float(), config.block_q), _blocks(k.float(), config.block_k)
    n_q, n_k, d = q_blocks.shape[-3], k_blocks.shape[-3], q.shape[-1]
    if kb == 0:
        return torch.full((*lead, n_q, 0), -1, dtype=torch.long, device=q.device)
    q_blocks = q_blocks.reshape(-1, n_q, config.block_q, d)
    k_flat = k_blocks.reshape(-1, config.block_k * d)
    bh = q_blocks.shape[0]
    n_i = causal_block_counts(t, config, q.device).view(n_q, 1)
    j = torch.arange(kb, device=q.device)
    lo = (j * n_i).div(kb, rounding_mode="floor").expand(bh, n_q, kb).contiguous()
    hi = ((j + 1) * n_i).div(kb, rounding_mode="floor").expand(bh, n_q, kb).contiguous()
    rounds = search_rounds(t, config)
    for r in range(int(rounds.max())):
        first = int(torch.searchsorted(rounds, r, right=True))  # query blocks first.. still have wide branches
        a_lo, a_hi = lo[:, first:], hi[:, first:]
        mid = a_lo + (a_hi - a_lo + 1) // 2
        cand_lo, cand_hi = torch.cat([a_lo, mid], dim=-1), torch.cat([mid, a_hi], dim=-1)
        representative = ((cand_lo + cand_hi - 1) // 2).clamp(min=0)  # centre block of each half
        score = _branch_scores(q_blocks[:, first:], k_flat, representative, n_k, config.block_k)
        keep = score.masked_fill(cand_hi <= cand_lo, NEG_INF).topk(kb, dim=-1).indices
        lo[:, first:], hi[:, first:] = torch.gather(cand_lo, -1, keep), torch.gather(cand_hi, -1, keep)
    return torch.where(hi > lo, lo, -1).view(*lead, n_q, kb)


def key_index(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate keys of each query block: sorted indices [B, H, n_q, L] (selected blocks, sink, window and the
    block itself; −1 past the sequence) and which of them count (valid and not a repeat), L = k + sink + window +
    b_q."""
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
    return index, (index >= 0) & ~duplicate


def key_sets(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each query attends: indices [B, H, n_q, L] per query block and a mask [B, H, n_q, b_q, L]
    (selected blocks ∪ sink ∪ window, causal, each key once)."""
    index, valid = key_index(q, k, config)
    n_q = index.shape[-2]
    positions = torch.arange(n_q * config.block_q, device=q.device).view(n_q, config.block_q)
    return index, valid.unsqueeze(-2) & (index.unsqueeze(-2) <= positions.unsqueeze(-1))


def hip_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HiPConfig
) -> torch.Tensor:
    """Step 2 in plain torch (the reference path, and the one for float64 or autograd): every query block's keys
    gathered and attended with a materialised [n_q, b_q, L] score tensor."""
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


@dataclass
class HiPTiles:
    """HiP's key sets as FlexAttention tiles (`models/llm/attention/flex.py`): query block i of batch row b is tile
    b·n_q + i; `index` [N, H, L_k] are the original positions of its key columns (−1: none) and `key_pos` /
    `query_pos` the mask_mod's operands (key_pos ≤ query_pos ⇔ the key is selected and causal)."""

    index: torch.Tensor
    key_pos: torch.Tensor
    query_pos: torch.Tensor

    @property
    def kv_block(self) -> int:
        return tile_width(self.index.shape[-1])[1]


def hip_tiles(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> HiPTiles:
    """The tiles `hip_attention_flex` attends: L_k = L rounded up (`flex.tile_width`), so a config compiles one
    bucket whatever the length."""
    index, valid = key_index(q, k, config)
    batch, heads, n_q, width = index.shape
    l_k = tile_width(width)[0]
    index = torch.where(valid, index, -1)
    index = torch.cat([index, index.new_full((batch, heads, n_q, l_k - width), -1)], dim=-1)
    index = index.transpose(1, 2).reshape(batch * n_q, heads, l_k)
    key_pos = torch.where(index >= 0, index, NEVER).to(torch.int32)
    positions = torch.arange(n_q * config.block_q, device=q.device, dtype=torch.int32).view(1, n_q, 1, config.block_q)
    query_pos = positions.expand(batch, n_q, heads, config.block_q).reshape(batch * n_q, heads, config.block_q)
    return HiPTiles(index, key_pos, query_pos)


def hip_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HiPConfig
) -> torch.Tensor:
    """Step 2 through FlexAttention: each query block's keys gathered into a tile (`hip_tiles`), in chunks of
    `flex.chunk_tiles` tiles, so memory grows like T·(k + sink + window + b_q) / b_q, never T²."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # (transformers passes transposed projections)
    batch, heads, t, d = q.shape
    d_v = v.shape[-1]
    tiles = hip_tiles(q, k, config)
    n_q, l_k = tiles.index.shape[0] // batch, tiles.index.shape[-1]
    q_tiles = _blocks(q, config.block_q).transpose(1, 2).reshape(batch * n_q, heads, config.block_q, d)
    rows = tiles.index.clamp(min=0) + (torch.arange(batch * heads, device=q.device) * t).view(
        batch, 1, heads, 1
    ).expand(batch, n_q, heads, 1).reshape(batch * n_q, heads, 1)
    k_flat, v_flat = k.reshape(-1, d), v.reshape(-1, d_v)
    step = flex.chunk_tiles(heads, config.block_q, l_k, d, d_v, q.element_size())  # one FlexAttention call each
    out = q.new_empty(batch * n_q, heads, config.block_q, d_v)
    for s in range(0, batch * n_q, step):
        e = min(batch * n_q, s + step)
        idx = rows[s:e].reshape(-1)
        out[s:e] = tile_attention(
            q_tiles[s:e],
            k_flat.index_select(0, idx).view(e - s, heads, l_k, d),
            v_flat.index_select(0, idx).view(e - s, heads, l_k, d_v),
            scale,
            tiles.key_pos[s:e],
            tiles.query_pos[s:e],
            block=(config.block_q, tiles.kv_block),
        )
    return out.view(batch, n_q, heads, config.block_q, d_v).transpose(1, 2).reshape(batch, heads, -1, d_v)[..., :t, :]


def hip_attention_path(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HiPConfig, path: str = "auto"
) -> tuple[torch.Tensor, str]:
    """Causal HiP attention and the path that ran: "flex" (FlexAttention; the default wherever it can run) or
    "gather" (plain torch: float64, autograd, or `path="gather"`)."""
    if flex.choose(path, (q, k, v)) == "flex":
        try:
            return hip_attention_flex(q, k, v, scale, config), "flex"
        except torch._dynamo.exc.TorchDynamoException as error:  # cannot compile here (no C++ compiler, say)
            flex.mark_broken(error, path)
    return hip_attention_gather(q, k, v, scale, config), "gather"


def hip_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HiPConfig, path: str = "auto"
) -> torch.Tensor:
    """Causal HiP attention (step 2): q, k, v [B, H, T, d] → [B, H, T, d]."""
    return hip_attention_path(q, k, v, scale, config, path)[0]


def register_hip(config: HiPConfig = HiPConfig(), name: str = "hip") -> str:
    """Register HiP with transformers' `AttentionInterface` under `name` (prefill of the chosen layers; decoding
    and padded batches stay exact): `model.set_attn_implementation(name)`. Each prefill records its path
    (`kit.prefill_path(name)`)."""

    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, module: Any) -> torch.Tensor:
        out, path = hip_attention_path(q, k, v, scale, config)
        record_prefill_path(name, path)
        return out

    return register_attention(name, interface_function(prefill, last_layers_filter(config.last_layers)))


DEFAULT_NAME = register_hip()
