"""ℓ∞ projected gradient ascent (Madry et al., ICLR 2018) and robust accuracy, shared by the family.

`pgd_linf` maximises any per-example objective of the perturbed input (cross-entropy for PGD
attacks and PGD adversarial training, KL to the clean prediction for TRADES, a logit distance for
smooth adversarial losses), so each defence supplies only its objective. The model is put in eval
mode while attacking (batch-norm statistics untouched, as in the TRADES and Madry reference code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]  # perturbed inputs [B, ...] → per-example values [B]


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    step_size: float,
    steps: int,
    random_start: float | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """x' in the ℓ∞ ball of radius `eps` around x (and in `clip`), by `steps` signed-gradient ascent steps.

    `random_start`: None starts at a uniform point of the ball (Madry); a number s starts at
    x + s·N(0, 1) (TRADES' 0.001). Returns detached inputs.
    """
    was_training = model.training
    model.eval()
    x = x.detach()
    if random_start is None:
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    else:
        x_adv = x + random_start * torch.randn_like(x)
    for _ in range(steps):
        x_adv = _project(x_adv, x, eps, clip).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(x_adv).sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
    model.train(was_training)
    return _project(x_adv, x, eps, clip).detach()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, clip: tuple[float, float] | None) -> torch.Tensor:
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return x_adv.clamp(*clip) if clip is not None else x_adv


def pgd_cross_entropy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """The standard PGD attack: maximise the cross-entropy of the true label."""
    return pgd_linf(
        model, x, lambda xa: F.cross_entropy(model(xa), y, reduction="none"), eps, step_size, steps, clip=clip
    )


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 1024,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> float:
    """Accuracy under PGD-`steps` (cross-entropy, ℓ∞ radius eps, step 2.5·eps/steps unless given)."""
    if len(y) == 0:
        return float("nan")
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = pgd_cross_entropy(model, xb, yb, eps, step_size, steps, clip)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum().item()
        model.train(was_training)
    return correct / len(y)
