"""HyperAttention (Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention: Long-context Attention
in Near-Linear Time", ICLR 2024), our own torch implementation.

Non-causal approximation of softmax(QKᵀ·scale)V for n queries and m keys (the paper's Alg. 1 with the
sortLSH mask of Alg. 2 / Def. 1):

1. **sortLSH**: an angular LSH with r random hyperplanes hashes every query and key to r sign bits; buckets are
   ranked in Gray-code order so that neighbouring ranks differ by one bit (one hyperplane), and Q and K are
   each sorted by bucket rank. Large entries of QKᵀ (q and k at a small angle) then land near the diagonal of
   the *sorted* score matrix.
2. **Block-diagonal attention** over the sorted order with blocks of b queries × m/(n/b) keys, exact inside
   each block: (O₁, lse₁).
3. **Sampled residual**: s keys drawn uniformly with replacement; a query ignores samples that fall in its own
   diagonal block (those are already counted), and lse₂ is raised by log(m/s) — the sample's scores stand for
   the m/s-times larger residual (Alg. 1's unbiased estimator of D's off-block part, with V-row sampling
   replaced by uniform sampling as the public implementation does).
4. **Merge** by log-sum-exp (`kit.merge_lse`), unsort.

**Causal recursion** (the paper's Alg. 4): for n ≤ `min_seq_len` exact causal attention; otherwise split into
halves, recurse on the two diagonal (causal) halves, approximate the off-diagonal block Q₂K₁ᵀ — which is
fully visible, hence non-causal — by steps 1–4, and merge it into the second half by lse. With one block
(b ≥ n) the block-diagonal part is full attention and every sample is excluded, so the whole recursion is
exact (the unit tests). Randomness (hyperplanes, samples) comes from a generator seeded per layer and call
shape, so a forward pass is deterministic.

**Speed.** The default path (`hyper_attention_tiles`) runs each exact piece as dense tiles through one fused
kernel that also returns the lse (`flex.tiles_lse`): on CPU SDPA's own flash kernel, elsewhere FlexAttention (whose
CPU kernel cannot return the lse; an anchor key recovers it). Each LSH-sorted diagonal block with the s samples is
one tile (the samples weighted by a key bias), all splits of one depth at once: per query ≈ b + s keys per level
it is approximated at plus the leaf, against T/2 for dense attention. The pure-torch path (`hyper_attention_causal`,
materialised scores) stays for float64 and autograd, and is what the tiles are tested against.

The reference implementation (`insuhan/hyper-attn`, `models/attention/hyper_attn.py`, `angular_lsh.py`) was
consulted for the defaults only: 7 hyperplanes, b = m_samples = 256, min_seq_len 4096 on GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.llm.attention import flex
from models.llm.attention.flex import tiles_lse
from models.llm.attention.kit import (
    attention_with_lse,
    gather_rows,
    interface_function,
    last_layers_filter,
    merge_lse,
    record_prefill_path,
    register_attention,
)

NEG_INF = float("-inf")


@dataclass(frozen=True)
class HyperConfig:
    block_size: int = 256  # b: queries per diagonal block
    sample_size: int = 256  # s: uniformly sampled residual keys (0: block-diagonal only)
    lsh_bits: int = 7  # r hyperplanes → 2^r buckets
    min_seq_len: int = 4096  # causal recursion bottoms out in exact attention at this length
    last_layers: int | None = None  # patch only the last ℓ decoder layers (None: all)
    seed: int = 0


def gray_rank(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The position of each integer code in the r-bit Gray sequence g(i) = i ⊕ (i >> 1), i.e. g⁻¹(code):
    consecutive ranks differ in exactly one bit."""
    rank = codes.clone()
    shift = 1
    while shift < bits:
        rank = rank ^ (rank >> shift)
        shift <<= 1
    return rank


def lsh_rank(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Gray-ordered angular-LSH bucket of each row of x [..., n, d] under hyperplanes [d, r]: int64 [..., n]."""
    bits = planes.shape[-1]
    signs = (torch.matmul(x.to(planes.dtype), planes) > 0).long()
    codes = (signs * (2 ** torch.arange(bits, device=x.device))).sum(-1)
    return gray_rank(codes, bits)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if rows == 0 else torch.cat([x, x.new_zeros(*x.shape[:-2], rows, x.shape[-1])], dim=-2)


def hyper_attention_noncausal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HyperConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1–4 of the module docstring: q [B, H, n, d], k/v [B, H, m, d] → (o [B, H, n, d], lse [B, H, n])."""
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    blocks = max(1, math.ceil(n / config.block_size))
    if blocks == 1:  # one block: block-diagonal attention is exact and every sample would be excluded
        return attention_with_lse(q, k, v, scale)
    planes = torch.randn(d, config.lsh_bits, generator=generator).to(q.device)
    q_order = torch.argsort(lsh_rank(q, planes), dim=-1, stable=True)
    k_order = torch.argsort(lsh_rank(k, planes), dim=-1, stable=True)
    bq, bk = math.ceil(n / blocks), math.ceil(m / blocks)
    qs = _pad_rows(_gather(q, q_order), bq * blocks - n)
    ks = _pad_rows(_gather(k, k_order), bk * blocks - m)
    vs = _pad_rows(_gather(v, k_order), bk * blocks - m)
    lead = q.shape[:-2]
    key_pad = torch.zeros(bk * blocks, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    key_pad[m:] = NEG_INF
    o1, lse1 = attention_with_lse(
        qs.reshape(*lead, blocks, bq, d),
        ks.reshape(*lead, blocks, bk, d),
        vs.reshape(*lead, blocks, bk, v.shape[-1]),
        scale,
        bias=key_pad.view(blocks, 1, bk),
    )
    o1, lse1 = o1.reshape(*lead, blocks * bq, v.shape[-1])[..., :n, :], lse1.reshape(*lead, blocks * bq)[..., :n]
    if config.sample_size > 0:
        samples = torch.randint(0, m, (config.sample_size,), generator=generator).to(q.device)
        # the block of each sampled key in the sorted order: its position in k_order, // bk
        position = torch.argsort(k_order, dim=-1)  # [B, H, m]: sorted position of each original key
        sample_block = torch.div(position[..., samples], bk, rounding_mode="floor")  # [B, H, s]
        query_block = torch.div(torch.arange(n, device=q.device), bq, rounding_mode="floor")  # sorted order
        own = query_block.view(*([1] * len(lead)), n, 1) == sample_block.unsqueeze(-2)
        bias = torch.zeros(own.shape, device=q.device, dtype=key_pad.dtype).masked_fill(own, NEG_INF)
        o2, lse2 = attention_with_lse(qs[..., :n, :], k[..., samples, :], v[..., samples, :], scale, bias=bias)
        o1, lse1 = merge_lse(o1, lse1, o2, lse2 + math.log(m / config.sample_size))
    inverse = torch.argsort(q_order, dim=-1)
    return _gather(o1, inverse), torch.gather(lse1, -1, inverse)


def hyper_attention_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: HyperConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal recursion (Alg. 4): exact below `min_seq_len`, else two causal halves plus the non-causal
    off-diagonal block merged into the second half. q, k, v [B, H, n, d] with n queries at the n key positions."""
    n = q.shape[-2]
    if n <= max(config.min_seq_len, 1):
        return attention_with_lse(q, k, v, scale, causal=True)
    half = n // 2
    o_top, lse_top = hyper_attention_causal(
        q[..., :half, :], k[..., :half, :], v[..., :half, :], scale, config, generator
    )
    o_diag, lse_diag = hyper_attention_causal(
        q[..., half:, :], k[..., half:, :], v[..., half:, :], scale, config, generator
    )
    o_off, lse_off = hyper_attention_noncausal(
        q[..., half:, :], k[..., :half, :], v[..., :half, :], scale, config, generator
    )
    o_bottom, lse_bottom = merge_lse(o_diag, lse_diag, o_off, lse_off)
    return torch.cat([o_top, o_bottom], dim=-2), torch.cat([lse_top, lse_bottom], dim=-1)


# -- the tiles path ------------------------------------------------------------------------------------------------
# The same function as above (the same hyperplanes and samples, drawn in the same order; the same key sets and
# weights), with every exact attention a batch of dense tiles through one fused kernel (`flex.tiles_lse`): the
# leaves of the causal recursion as causal tiles; each off-diagonal block as one tile per LSH-sorted diagonal
# block — the block-diagonal BlockMask over the permuted sequence, cut into its blocks — and, as a second small
# dense pass, one tile per block against the s samples (bias log(m/s); −inf for the samples in the query's own
# block, as above), merged by lse. The splits of one depth run together; every tile's lse comes with it.

Draw = tuple[torch.Tensor, torch.Tensor | None] | None  # (hyperplanes, samples) of one off-diagonal block


def recursion_plan(n: int, min_seq_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]:
    """The causal recursion's leaves (start, length) in order, and its splits (start, half, length, depth) in the
    order `hyper_attention_causal` draws their randomness: top half, bottom half, then the split's own
    off-diagonal block (queries start+half … start+length−1 against keys start … start+half−1)."""
    leaves: list[tuple[int, int]] = []
    splits: list[tuple[int, int, int, int]] = []

    def visit(start: int, length: int, depth: int) -> None:
        if length <= max(min_seq_len, 1):
            leaves.append((start, length))
            return
        half = length // 2
        visit(start, half, depth + 1)
        visit(start + half, length - half, depth + 1)
        splits.append((start, half, length, depth))

    visit(0, n, 0)
    return leaves, splits


def draw(n: int, m: int, d: int, config: HyperConfig, generator: torch.Generator, device: torch.device) -> Draw:
    """The randomness `hyper_attention_noncausal` draws for n queries and m keys (None for one block: none)."""
    if max(1, math.ceil(n / config.block_size)) == 1:
        return None
    planes = torch.randn(d, config.lsh_bits, generator=generator).to(device)
    samples = torch.randint(0, m, (config.sample_size,), generator=generator).to(device) if config.sample_size else None
    return planes, samples


@dataclass(frozen=True)
class Problems:
    """G same-shaped non-causal problems inside [B, H, T, ·] tensors: problem g's queries sit at positions
    `queries[g]` and its keys at `keys[g]` ([G, n] and [G, m]). `tiling` = (length, offset) when problem g's
    queries are positions g·length + offset … (+ n − 1) and G·length = T (the splits of one depth of a power-of-two
    recursion): then they are read and written as strided views, not gathered."""

    queries: torch.Tensor
    keys: torch.Tensor
    tiling: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.queries.shape[0], self.queries.shape[1], self.keys.shape[1]

    def view(self, x: torch.Tensor) -> torch.Tensor | None:
        """The queries' rows of x [B, H, T, ·] as a [B, H, G, n, ·] view (None unless `tiling`)."""
        if self.tiling is None:
            return None
        length, offset = self.tiling
        groups, n, _ = self.shape
        return x.view(*x.shape[:2], groups, length, x.shape[-1])[..., offset : offset + n, :]


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, ·] at positions [B, H, G, n] (or [G, n] for all rows and heads) → [B, H, G, n, ·]."""
    batch, heads = x.shape[:2]
    positions = positions.expand(batch, heads, *positions.shape[-2:])
    return gather_rows(x, positions.reshape(batch, heads, -1)).view(*positions.shape, x.shape[-1])


def _ranks(x: torch.Tensor, positions: torch.Tensor, view: torch.Tensor | None, planes: torch.Tensor) -> torch.Tensor:
    """`lsh_rank` of G problems' rows at once: x [B, H, T, d] at positions [G, n] (or the strided `view` of them)
    with hyperplanes [G, d, r] → [B, H, G, n]."""
    groups, bits = planes.shape[0], planes.shape[-1]
    padded = torch.cat([planes, planes.new_zeros(groups, planes.shape[1], (-bits) % 16)], dim=-1)  # 16 columns
    rows = _rows(x, positions) if view is None else view  # run 2.5× faster than 7
    signs = torch.matmul(rows.to(planes.dtype), padded)[..., :bits] > 0
    codes = (signs.long() * (2 ** torch.arange(bits, device=x.device))).sum(-1)
    return gray_rank(codes, bits)


def _leaves(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, leaves: list[tuple[int, int]], kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention inside every leaf of the recursion, with its lse (`flex.tiles_lse`): one causal tile
    per leaf — a view of q, k, v when the leaves are equal (the heads × leaves as the kernel's batch × heads),
    else gathered, each padded at its end to the longest (causally invisible to its real queries)."""
    batch, heads, t, d = q.shape
    longest = max(length for _, length in leaves)
    if longest * len(leaves) == t:  # equal leaves tile the sequence: [B·H, n_leaves, L, ·] views
        out, lse = tiles_lse(
            *(x.reshape(batch * heads, len(leaves), longest, x.shape[-1]) for x in (q, k, v)),
            scale,
            causal=True,
            kernel=kernel,
        )
        return out.reshape(batch, heads, t, -1), lse.reshape(batch, heads, t)
    starts = torch.tensor([s for s, _ in leaves]).view(-1, 1)
    r = torch.arange(longest)
    valid = r < torch.tensor([n for _, n in leaves]).view(-1, 1)  # [n_leaves, longest]
    index = torch.where(valid, starts + r, t - 1).view(-1).to(q.device)  # padding: any row, never seen

    def tiles(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, ·] → [B·H, n_leaves, longest, ·]
        return gather_rows(x, index.expand(batch, heads, -1)).view(batch * heads, len(leaves), longest, -1)

    out, lse = tiles_lse(tiles(q), tiles(k), tiles(v), scale, causal=True, kernel=kernel)
    keep = valid.view(-1).nonzero().squeeze(-1).to(q.device)
    return out.reshape(batch, heads, -1, v.shape[-1])[..., keep, :], lse.reshape(batch, heads, -1)[..., keep]


def _noncausal_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    problems: Problems,
    scale: float,
    config: HyperConfig,
    planes: torch.Tensor | None,
    samples: torch.Tensor | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hyper_attention_noncausal` as tiles for G same-shaped problems at once (`Problems`) inside q, k, v [B, H,
    T, ·], problem g with its own hyperplanes `planes[g]` [d, r] and samples `samples[g]` [s] (None: one block,
    exact). The sorted rows are gathered straight from q, k, v in tile layout (padding rows point anywhere: their
    queries are dropped, their keys masked). Step 2 is one tile per LSH-sorted diagonal block (its b_q sorted
    queries against its b_k sorted keys); step 3 one tile per block against the s samples (weighted by m/s
    through the bias log(m/s), dropped in the query's own block; one [s, ·] key set seen by every block through a
    stride-0 view); both through `flex.tiles_lse`, merged by lse. Returns o [B, H, G, n, d_v] and lse [B, H, G, n]
    in the problems' own query order."""
    batch, heads = q.shape[:2]
    groups, n, m = problems.shape
    d, d_v, device = q.shape[-1], v.shape[-1], q.device
    tiles = batch * heads * groups
    blocks = 1 if planes is None else max(1, math.ceil(n / config.block_size))
    bq, bk = math.ceil(n / blocks), math.ceil(m / blocks)
    q_at = problems.queries.expand(batch, heads, groups, n)
    k_at = problems.keys.expand(batch, heads, groups, m)
    q_order = k_order = None
    if planes is not None:
        q_order = torch.argsort(_ranks(q, problems.queries, problems.view(q), planes), dim=-1, stable=True)
        k_order = torch.argsort(_ranks(k, problems.keys, None, planes), dim=-1, stable=True)
        q_at, k_at = torch.gather(q_at, -1, q_order), torch.gather(k_at, -1, k_order)
    q_at = torch.cat([q_at, q_at[..., :1].expand(-1, -1, -1, bq * blocks - n)], dim=-1)
    k_at = torch.cat([k_at, k_at[..., :1].expand(-1, -1, -1, bk * blocks - m)], dim=-1)
    q_tiles = _rows(q, q_at).view(tiles, blocks, bq, d)
    padding = None
    if bk * blocks > m:  # the last block's missing keys
        keep = torch.arange(bk * blocks, device=device) < m
        padding = torch.where(keep, 0.0, NEG_INF).view(1, blocks, bk).expand(tiles, blocks, bk)
    o, lse = tiles_lse(
        q_tiles,
        _rows(k, k_at).view(tiles, blocks, bk, d),
        _rows(v, k_at).view(tiles, blocks, bk, d_v),
        scale,
        key_bias=padding,
        kernel=kernel,
    )
    s = 0 if samples is None else samples.shape[-1]
    if s:
        assert samples is not None and k_order is not None
        position = torch.argsort(k_order, dim=-1)  # [B, H, G, m]: sorted position of each key
        local = samples.expand(batch, heads, groups, s)
        sample_block = torch.div(torch.gather(position, -1, local), bk, rounding_mode="floor")  # [B, H, G, s]
        in_own = sample_block.view(tiles, 1, s) == torch.arange(blocks, device=device).view(1, -1, 1)
        at = torch.gather(problems.keys, -1, samples)  # [G, s] positions
        o2, lse2 = tiles_lse(
            q_tiles,
            _rows(k, at).view(tiles, 1, s, d).expand(-1, blocks, -1, -1),
            _rows(v, at).view(tiles, 1, s, d_v).expand(-1, blocks, -1, -1),
            scale,
            key_bias=torch.where(in_own, NEG_INF, math.log(m / s)),  # own-block samples are already counted
            kernel=kernel,
        )
        o, lse = merge_lse(o, lse, o2, lse2)
    o = o.reshape(batch, heads, groups, blocks * bq, d_v)
    lse = lse.reshape(batch, heads, groups, blocks * bq)
    if q_order is None:
        return o[..., :n, :], lse[..., :n]
    inverse = torch.argsort(q_order, dim=-1)
    return gather_rows(o, inverse), torch.gather(lse, -1, inverse)


def _stacked(draws: list[Draw]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The hyperplanes [G, d, r] and samples [G, s] of G problems (None where they draw none)."""
    if draws[0] is None:
        return None, None
    planes = torch.stack([d[0] for d in draws if d is not None])
    samples = [d[1] for d in draws if d is not None and d[1] is not None]
    return planes, torch.stack(samples) if samples else None


def hyper_attention_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: HyperConfig,
    generator: torch.Generator,
    causal: bool = True,
    kernel: str = "sdpa-tiles",
) -> torch.Tensor:
    """HyperAttention on tiles (`kernel`: "sdpa-tiles" or "flex", `flex.tiles_lse`), the same function as
    `hyper_attention_causal` / `_noncausal` (the same draws, in the same order): the leaves at once, then, deepest
    first (the recursion's own merge order), the off-diagonal blocks of all splits of one depth and shape at
    once, each lse-merged into its bottom half."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # rows are gathered from these, level after level
    batch, heads, n, d = q.shape
    device = q.device
    if not causal:
        planes, samples = _stacked([draw(n, k.shape[-2], d, config, generator, device)])
        whole = Problems(
            torch.arange(n, device=device).view(1, n), torch.arange(k.shape[-2], device=device).view(1, -1)
        )
        o, _ = _noncausal_tiles(q, k, v, whole, scale, config, planes, samples, kernel)
        return o.squeeze(2)
    leaves, splits = recursion_plan(n, config.min_seq_len)
    draws = [draw(length - half, half, d, config, generator, device) for _, half, length, _ in splits]
    o, lse = _leaves(q, k, v, scale, leaves, kernel)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (_, half, length, depth) in enumerate(splits):
        groups.setdefault((depth, half, length), []).append(i)
    for (_, half, length), members in sorted(groups.items(), key=lambda item: -item[0][0]):
        starts = torch.tensor([splits[i][0] for i in members], device=device).view(-1, 1)
        tiled = len(members) * length == n and all(splits[i][0] == g * length for g, i in enumerate(members))
        problems = Problems(
            starts + half + torch.arange(length - half, device=device),  # the bottom half's queries
            starts + torch.arange(half, device=device),  # against the top half's keys
            (length, half) if tiled else None,
        )
        planes, samples = _stacked([draws[i] for i in members])
        o_off, lse_off = _noncausal_tiles(q, k, v, problems, scale, config, planes, samples, kernel)
        o_at, lse_at = problems.view(o), problems.view(lse.unsqueeze(-1))
        if o_at is not None and lse_at is not None:  # write through the views
            merged, merged_lse = merge_lse(o_at, lse_at.squeeze(-1), o_off, lse_off)
            o_at.copy_(merged)
            lse_at.copy_(merged_lse.unsqueeze(-1))
        else:
            bottom = problems.queries.reshape(-1)
            merged, merged_lse = merge_lse(
                o[..., bottom, :], lse[..., bottom], o_off.flatten(2, 3), lse_off.flatten(2, 3)
            )
            o[..., bottom, :], lse[..., bottom] = merged, merged_lse
    return o


def hyper_attention_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: HyperConfig,
    causal: bool = True,
    seed: int | None = None,
    path: str = "auto",
) -> tuple[torch.Tensor, str]:
    """HyperAttention output [B, H, n, d] (causal: the recursion; else one non-causal approximation) and the path
    that ran: "sdpa-tiles" (the tiles through SDPA's fused CPU kernel; the default on CPU), "flex" (through
    FlexAttention; the default elsewhere) or "gather" (plain torch: float64, autograd, or `path="gather"`); all
    draw the same randomness and compute the same function."""
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    kernel = flex.choose(path, (q, k, v), ("sdpa-tiles", "flex"))
    if kernel != "gather":
        try:
            return hyper_attention_tiles(q, k, v, scale, config, generator, causal, kernel), kernel
        except torch._dynamo.exc.TorchDynamoException as error:  # cannot compile here (no C++ compiler, say)
            flex.mark_broken(error, path)
            generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    fn = hyper_attention_causal if causal else hyper_attention_noncausal
    return fn(q, k, v, scale, config, generator)[0], "gather"


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: HyperConfig,
    causal: bool = True,
    seed: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """HyperAttention output [B, H, n, d] (`hyper_attention_path`)."""
    return hyper_attention_path(q, k, v, scale, config, causal, seed, path)[0]


def register_hyperattention(config: HyperConfig = HyperConfig(), name: str = "hyperattention") -> str:
    """Register HyperAttention with transformers' `AttentionInterface` under `name` (for prefill of the chosen
    layers; decoding steps and padded batches stay exact): `model.set_attn_implementation(name)`. Each prefill
    records its path (`kit.prefill_path(name)`)."""

    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, module: Any) -> torch.Tensor:
        seed = config.seed * 1009 + int(getattr(module, "layer_idx", 0) or 0)
        out, path = hyper_attention_path(q, k, v, scale, config, causal=True, seed=seed)
        record_prefill_path(name, path)
        return out

    return register_attention(name, interface_function(prefill, last_layers_filter(config.last_layers)))


DEFAULT_NAME = register_hyperattention()
