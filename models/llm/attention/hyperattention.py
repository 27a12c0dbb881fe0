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

The reference implementation (`insuhan/hyper-attn`, `models/attention/hyper_attn.py`, `angular_lsh.py`) was
consulted for the defaults only: 7 hyperplanes, b = m_samples = 256, min_seq_len 4096 on GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.llm.attention.kit import (
    attention_with_lse,
    interface_function,
    last_layers_filter,
    merge_lse,
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


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: HyperConfig,
    causal: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """HyperAttention output [B, H, n, d] (causal: the recursion; else one non-causal approximation)."""
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    fn = hyper_attention_causal if causal else hyper_attention_noncausal
    return fn(q, k, v, scale, config, generator)[0]


def register_hyperattention(config: HyperConfig = HyperConfig(), name: str = "hyperattention") -> str:
    """Register HyperAttention with transformers' `AttentionInterface` under `name` (for prefill of the chosen
    layers; decoding steps and padded batches stay exact): `model.set_attn_implementation(name)`."""

    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, module: Any) -> torch.Tensor:
        return hyper_attention(
            q, k, v, scale, config, causal=True, seed=config.seed * 1009 + int(getattr(module, "layer_idx", 0) or 0)
        )

    return register_attention(name, interface_function(prefill, last_layers_filter(config.last_layers)))


DEFAULT_NAME = register_hyperattention()
