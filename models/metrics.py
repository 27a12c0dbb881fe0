"""Evaluation metrics shared by the classification family: accuracy, calibration, likelihood.

Calibration uses torchmetrics (`multiclass_calibration_error`, 15 equal-width confidence bins,
the usual ECE of Guo et al. 2017 with `norm="l1"` and the maximum calibration error with
`norm="max"`); `reliability_bins` gives the per-bin accuracy/confidence/count that the reliability
diagram (`models.plots.reliability_figure`) draws and that ECE sums: ECE = Σ_b (n_b/n)·|acc_b − conf_b|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

N_BINS = 15


def calibration_error(logits: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS, norm: str = "l1") -> float:
    """ECE (`norm="l1"`) or MCE (`norm="max"`) of softmax(logits) over equal-width confidence bins."""
    if len(target) == 0:
        return float("nan")
    probs = F.softmax(logits.float(), dim=1)
    return multiclass_calibration_error(probs, target, num_classes=logits.shape[1], n_bins=n_bins, norm=norm).item()


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS) -> dict[str, float]:
    """Accuracy, ECE, MCE and NLL (mean cross-entropy, nats) of one split's logits."""
    if len(target) == 0:
        return {"acc": float("nan"), "ece": float("nan"), "mce": float("nan"), "nll": float("nan")}
    return {
        "acc": (logits.argmax(1) == target).float().mean().item(),
        "ece": calibration_error(logits, target, n_bins, "l1"),
        "mce": calibration_error(logits, target, n_bins, "max"),
        "nll": F.cross_entropy(logits.float(), target).item(),
    }


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: edges [n_bins+1], mean accuracy, mean confidence and example count."""

    edges: list[float]
    accuracy: list[float]
    confidence: list[float]
    count: list[int]

    @property
    def ece(self) -> float:
        n = sum(self.count)
        return sum(c / n * abs(a - p) for a, p, c in zip(self.accuracy, self.confidence, self.count) if c) if n else 0.0


def reliability_bins(logits: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS) -> ReliabilityBins:
    """Top-label confidences binned as torchmetrics bins them (right-closed bins (b/B, (b+1)/B])."""
    conf, pred = F.softmax(logits.float(), dim=1).max(dim=1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    which = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(which, minlength=n_bins)
    safe = count.clamp_min(1).float()
    acc = torch.zeros(n_bins).index_add_(0, which, correct) / safe
    mean_conf = torch.zeros(n_bins).index_add_(0, which, conf) / safe
    return ReliabilityBins(edges.tolist(), acc.tolist(), mean_conf.tolist(), count.tolist())
