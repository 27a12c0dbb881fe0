"""Classification losses shared by the family, each an `nn.Module` called as `loss(logits, target, index)`.

`index` is each example's position in the training split; only stateful losses use it, the
others accept and ignore it so that one training loop (`models.training`) drives them all.
A loss that needs more than the clean logits (mixup pairs, adversarial examples, a second view)
subclasses `BatchLoss`: the loop then calls it as `loss(model, x, target, index)` and the loss
makes what it needs from the batch itself, still one class and no new loop.
These are the baselines of the noisy-label literature, as in the LDR paper's comparison:

- cross-entropy;
- generalised cross-entropy (Zhang & Sabuncu, NeurIPS 2018, eq. 6): (1 − p_y^q)/q, which
  interpolates between CE (q → 0) and MAE (q = 1);
- mean absolute error on the probability simplex (Ghosh, Kumar & Sastry, AAAI 2017):
  ‖e_y − p‖₁ = 2(1 − p_y), symmetric and therefore robust to uniform noise, but slow to fit.
  (The LDR repository's `MAELoss` sums e_y − p without the absolute value, which is identically
  zero; this is the loss the papers define.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchLoss(nn.Module):
    """A loss that runs the model itself: `forward(model, x, target, index)` → scalar.

    `needs` names what it builds from the batch (e.g. {"mixup"}, {"adversarial"}), for readers and
    for the trainer's log; the trainer's only rule is to hand it the model and the raw inputs.
    """

    needs: frozenset[str] = frozenset()

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class GeneralizedCrossEntropy(nn.Module):
    def __init__(self, q: float = 0.7):
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"GCE needs 0 < q <= 1, got {q}")
        self.q = q

    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        log_p_y = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return ((1.0 - torch.exp(self.q * log_p_y)) / self.q).mean()


class MeanAbsoluteError(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        p_y = F.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return (2.0 * (1.0 - p_y)).mean()
