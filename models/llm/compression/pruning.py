"""Weight pruning of linear layers: magnitude, Wanda and SparseGPT, unstructured or N:M.

A pattern is either a sparsity s (fraction of zeros) or N:M (at most N nonzeros in every group of M
consecutive input weights of a row — the layout Ampere's sparse tensor cores run). Masks are
boolean "keep" tensors shaped like the weight.

- Magnitude: score |W_ij|, compared per layer.
- Wanda (Sun et al. 2024, Eq. 1): score |W_ij|·‖X_j‖₂, compared per output row (the paper's
  "per output" comparison group); no weight update.
- SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune columns left to right with the Optimal Brain
  Surgeon update W[:, j:] −= (w_j − ŵ_j)/[H⁻¹]_jj · [H⁻¹]_{j, j:} read off the upper Cholesky
  factor of H⁻¹ (H = 2XXᵀ + λI, λ = 1% of mean diag). Masks are chosen adaptively per block of
  B = 128 columns by w²/[H⁻¹]_jj² (Eq. 3's OBS saliency), and for N:M per group of M columns as
  the pass reaches it. Built from the paper's algorithm; checked against the structure of the
  reference `sparsegpt.py: fasterprune` (same damping, block size, saliency and lazy batch update).

The reconstruction error the three minimise (SparseGPT exactly up to its greedy order, the others
not at all) is ‖(W − Ŵ)X‖²_F = tr((W − Ŵ) G (W − Ŵ)ᵀ), G = XXᵀ; `reconstruction_error` computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

PruneMethod = Literal["magnitude", "wanda", "sparsegpt"]
SPARSITY_PATTERN = r"^(0?\.\d+|\d+:\d+)$"


@dataclass(frozen=True)
class SparsityPattern:
    """A fraction of zeros (`sparsity`), or N:M (`n` nonzeros kept in every group of `m`)."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | float) -> SparsityPattern:
        text = str(text).strip()
        if match := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {text}")
            return cls(1.0 - n / m, n, m)
        value = float(text)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return cls(value)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive entries along the last axis."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features do not split into groups of {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Zero the `sparsity` fraction of lowest scores, per output row or across the whole layer."""
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: SparsityPattern, per_row: bool) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity, per_row)


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ (Wanda, Eq. 1)."""
    return weight.abs() * feature_norms.to(weight.dtype)[None, :]


def damped_inverse_cholesky(gram: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, H = 2G, λ = percdamp·mean diag(H); also the dead-input mask
    (features that never fired get H_jj = 1 and their weights zeroed, as the reference does)."""
    h = 2.0 * gram.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Alg. 1): the pruned, OBS-updated weight and its keep mask."""
    w = weight.to(torch.float64).clone()
    hinv, dead = damped_inverse_cholesky(gram, percdamp)
    w[:, dead] = 0.0
    rows, cols = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = hinv1.diagonal()
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if not pattern.is_nm and pattern.sparsity > 0:  # adaptive mask for the block: lowest OBS saliency
            saliency = w1**2 / d[None, :] ** 2
            mask1 = ~unstructured_mask(saliency, pattern.sparsity, per_row=False)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                saliency = w1[:, i : i + pattern.m] ** 2 / d[None, i : i + pattern.m] ** 2
                mask1[:, i : i + pattern.m] = ~nm_mask(saliency, pattern.n, pattern.m)
            q = torch.where(mask1[:, i], 0.0, w1[:, i])
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]  # OBS update of the not-yet-pruned columns
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
        pruned[:, i1:i2] = mask1
    return w.to(weight.dtype), ~pruned


def prune_weight(
    weight: torch.Tensor, pattern: SparsityPattern, method: PruneMethod, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask) by one of the three rules; Wanda and SparseGPT need the input Gram matrix."""
    if method == "magnitude":
        keep = pattern_mask(weight.abs(), pattern, per_row=False)
        return weight * keep, keep
    if gram is None:
        raise ValueError(f"{method} pruning needs calibration statistics")
    if method == "wanda":
        keep = pattern_mask(wanda_scores(weight, gram.diagonal().clamp_min(0).sqrt()), pattern, per_row=True)
        return weight * keep, keep
    if method == "sparsegpt":
        return sparsegpt(weight, gram, pattern)
    raise ValueError(f"unknown pruning method {method!r}")


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖²_F = tr(ΔW G ΔWᵀ)."""
    delta = (weight - approx).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", delta, gram.to(torch.float64), delta))
