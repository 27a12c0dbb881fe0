"""Adam's moment update and the base class shared by the optimizers here that run Adam on a view of the gradient.

FRUGAL runs it on the projected gradient, Stable-SPAM on the clipped and renormalised gradient, SST
on the active singular vectors and values. Written with the same operations as `torch.optim.AdamW`'s
single-tensor path (lerp for the first moment, bias-corrected √v in the denominator, ε added after the
correction), so "full density equals AdamW" holds to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def adam_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
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


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base of FRUGAL and SST: they draw random subspaces from their own seeded generator, which travels in
    the state dict (so a resumed run draws the same subspaces), and give the parameters outside the
    subspace machinery plain AdamW."""

    def __init__(self, params: Any, defaults: dict[str, Any], seed: int):
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("step", 0)
        self._generator = torch.Generator().manual_seed(seed)

    def adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        direction = adam_direction(
            p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"], group["eps"]
        )
        decay_weights(p, group["lr"], group["weight_decay"])
        p.sub_(group["lr"] * direction)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every non-"step" tensor to the parameter's dtype
            if "indices" in state:
                state["indices"] = state["indices"].long()
        if generator is not None:
            self._generator.set_state(generator.to(torch.uint8))
