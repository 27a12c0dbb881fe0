"""The InfoNCE family on L2-normalised embeddings, one function per shape of positive set.

`nt_xent` is SimCLR's loss (Chen et al. 2020, eq. 1) over the 2N views of N images: anchor i's
positive is its other view, its negatives the 2N − 2 remaining views. It returns one value per
anchor when asked (`reduction="none"`), which DBPM's per-instance memory needs, and accepts a
[2N, 2N] matrix of temperatures, one per pair (AMCL). `multi_positive_info_nce` takes an explicit
positive mask and a mask of the pairs that count as negatives (SupCon, Hydra).
pytorch-metric-learning's `NTXentLoss` and `SupConLoss` are the numerical references in the tests.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def cosine_matrix(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """[2N, 2N] cosine similarities of the stacked views (view-1 rows first)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    return z @ z.T


def positive_index(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """For each of the 2N stacked views, the row of its other view."""
    return torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float | torch.Tensor = 0.5, reduction: Reduction = "mean"
) -> torch.Tensor:
    """−log( e^{s_ip/τ_ip} / Σ_{k≠i} e^{s_ik/τ_ik} ) for each of the 2N anchors i (p: i's other view)."""
    n = len(z1)
    logits = cosine_matrix(z1, z2) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    loss = F.cross_entropy(logits, positive_index(n, logits.device), reduction="none")
    return loss.mean() if reduction == "mean" else loss


def multi_positive_info_nce(
    logits: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Σ_{j∈P(i)} [log(e^{l_ij} + Σ_{k∈N(i)} e^{l_ik}) − l_ij], averaged over all positive pairs.

    Each positive competes only with the negatives, not with the other positives (Hydra's
    `multipos_ce_loss`; SupCon's L_out differs by letting positives compete too). `positives`
    and `negatives` are boolean [B, M] masks; `reduction="none"` returns the per-anchor sums.
    """
    neg = torch.logsumexp(logits.masked_fill(~negatives, float("-inf")), dim=1, keepdim=True)
    per_pair = torch.logaddexp(logits, neg) - logits
    per_anchor = (per_pair * positives).sum(dim=1)
    if reduction == "none":
        return per_anchor
    return per_anchor.sum() / positives.sum().clamp_min(1)
