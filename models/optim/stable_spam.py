"""Stable-SPAM: Adam with adaptive spike clipping, adaptive gradient-norm scaling and momentum resets.

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam" (2025), Algorithm 1:

1. AdaClip (Eq. 2): M_t = θ M_{t−1} + (1−θ) max|g|, M̂ = M_t/(1−θ^t); entries with |g| > M̂ become
   g·M̂/max|g|, so ‖g‖_∞ ≤ M̂ afterwards.
2. AdaGN (Eq. 3): m_t = γ₁ m + (1−γ₁)‖g‖, v_t = γ₂ v + (1−γ₂)‖g‖², both bias-corrected by the global
   step; g ← (g/‖g‖)·m̂/(√v̂ + ε). The new norm is a running average of past norms, so a spike in one
   step cannot inflate the update, and multiplying the loss by c leaves g/‖g‖ and m̂/√v̂ unchanged:
   the update is invariant to loss scaling (up to ε), which the tests pin.
3. Adam on the rescaled g with bias correction and decoupled weight decay.
4. Every `reset_interval` steps (ΔT) the Adam moments are zeroed and Adam's step counter restarts at 1
   (SPAM's momentum reset); the clip and norm statistics keep running.
5. Optionally (`total_T` = T) β₁ and γ₁ are scaled by a factor s_t that decays from 1 to `eta_min` = η
   over T steps. The reference steps torch's `CosineAnnealingLR` (T_max = T + 1, base value 1) once per
   optimizer step, setting its epoch to the global step t first, so the factor follows the scheduler's
   recursive form rather than its closed form:

       s_0 = 1,   s_t = η + (s_{t−1} − η)·(1 + cos(π(t+1)/(T+1)))/(1 + cos(πt/(T+1)))   for t < T,   s_t = η for t ≥ T.

   The product telescopes to η + (1−η)(1 + cos(π(t+1)/(T+1)))/(1 + cos(π/(T+1))), already below 1 at the
   first step; we compute the recursion with the scheduler's own float operations (`cosine_decay`), so
   the factor is the reference's to the last bit, and keep s_t in the param group.

Checked against `TianjinYellow/StableSPAM` (https://github.com/TianjinYellow/StableSPAM,
`galore_torch/stablespam.py`) through `pytorch_optimizer.StableSPAM` 4.1.0, against which tests check
step-by-step agreement with and without the cosine decay. Unlike the library we never write into
`p.grad`, and all counters (and s_t) live in the param groups, so the state dict round-trips through
the safetensors checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from models.optim.moments import adam_direction, decay_weights, evaluate_closure


def ada_clip(grad: torch.Tensor, max_avg: torch.Tensor, theta: float, total_step: int) -> torch.Tensor:
    """AdaClip (Eq. 2): update the running max-|g| in place and clip entries above its corrected value."""
    max_grad = grad.abs().max()
    max_avg.lerp_(max_grad, 1.0 - theta)
    bound = max_avg / (1.0 - theta**total_step)
    return torch.where(grad.abs() > bound, grad / max_grad * bound, grad)


def ada_gn(
    grad: torch.Tensor,
    norm_avg: torch.Tensor,
    norm_sq_avg: torch.Tensor,
    gamma1: float,
    gamma2: float,
    total_step: int,
    eps: float,
) -> torch.Tensor:
    """AdaGN (Eq. 3): rescale g to the bias-corrected running norm m̂/(√v̂+ε); norms kept in place."""
    norm = torch.linalg.vector_norm(grad)
    norm_avg.lerp_(norm, 1.0 - gamma1)
    norm_sq_avg.lerp_(norm.square(), 1.0 - gamma2)
    m_hat = norm_avg / (1.0 - gamma1**total_step)
    v_hat = norm_sq_avg / (1.0 - gamma2**total_step)
    return grad / norm * (m_hat / (v_hat.sqrt() + eps))


def cosine_decay(previous: float, step: int, total_steps: int | None, eta_min: float) -> float:
    """The factor s_t of β₁ and γ₁ at global step `step` (≥ 1) from s_{t−1} = `previous` (1 before the first
    step): one step of `CosineAnnealingLR(T_max=total_steps + 1, eta_min)` from epoch `step` to `step` + 1,
    written as torch writes it, and `eta_min` from `total_steps` on. 1 when there is no decay."""
    if total_steps is None:
        return 1.0
    if step >= total_steps:
        return eta_min
    t_max, epoch = total_steps + 1, step + 1
    return (1 + math.cos(math.pi * epoch / t_max)) / (1 + math.cos(math.pi * (epoch - 1) / t_max)) * (
        previous - eta_min
    ) + eta_min


class StableSPAM(torch.optim.Optimizer):
    """Stable-SPAM (defaults: the paper's INT4 settings γ₁ = 0.7, γ₂ = 0.9, θ = 0.999)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        theta: float = 0.999,
        reset_interval: int = 500,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        total_T: int | None = None,
        eta_min: float = 0.5,
    ):
        if reset_interval < 1:
            raise ValueError("reset_interval must be at least 1")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            gamma1=gamma1,
            gamma2=gamma2,
            theta=theta,
            reset_interval=reset_interval,
            eps=eps,
            weight_decay=weight_decay,
            total_T=total_T,
            eta_min=eta_min,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("step", 0)  # Adam's step, restarted at each reset
            group.setdefault("total_step", 0)  # never restarted: bias correction of the clip and norm averages
            group.setdefault("decay", 1.0)  # s_t, the cosine factor of β₁ and γ₁ (1: no decay yet)

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            scalar = torch.zeros((), dtype=p.dtype, device=p.device)
            state.update(
                exp_avg=torch.zeros_like(p),
                exp_avg_sq=torch.zeros_like(p),
                max_avg=scalar.clone(),
                norm_avg=scalar.clone(),
                norm_sq_avg=scalar.clone(),
            )
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            group["total_step"] += 1
            total = group["total_step"]
            reset = total % group["reset_interval"] == 0
            group["step"] = 1 if reset else group["step"] + 1
            scale = group["decay"] = cosine_decay(group["decay"], total, group["total_T"], group["eta_min"])
            betas = (group["betas"][0] * scale, group["betas"][1])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                if reset:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                decay_weights(p, group["lr"], group["weight_decay"])
                grad = ada_clip(p.grad, state["max_avg"], group["theta"], total)
                if not torch.any(grad):  # a zero gradient has no direction to rescale
                    continue
                grad = ada_gn(
                    grad,
                    state["norm_avg"],
                    state["norm_sq_avg"],
                    group["gamma1"] * scale,
                    group["gamma2"],
                    total,
                    group["eps"],
                )
                direction = adam_direction(
                    grad, state["exp_avg"], state["exp_avg_sq"], group["step"], betas, group["eps"]
                )
                p.add_(direction, alpha=-group["lr"])
        return loss
