"""Adam's moment update, shared by every optimizer here that runs Adam on some view of the gradient.

FRUGAL runs it on the projected gradient, Stable-SPAM on the clipped and renormalised gradient, SST
on the active singular vectors and values. Written with the same operations as `torch.optim.AdamW`'s
single-tensor path (lerp for the first moment, bias-corrected √v in the denominator, ε added after the
correction), so "full density equals AdamW" holds to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Update the moments in place and return m̂/(√v̂+ε) scaled as AdamW does (bias-corrected).

    `step` is the 1-based count of updates these moments have seen, including this one. The result is
    the direction to *subtract* (times the learning rate).
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg / denom / bias_correction1


def decay_weights(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay (Loshchilov & Hutter), applied before the update as AdamW does."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)


def evaluate_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The `step(closure)` protocol: re-evaluate the loss with gradients on (steps run under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
