"""Hessian-vector products by double backward, and Hutchinson's estimate of the Hessian trace.

Liu et al. ("Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models", 2023)
measure a model's flatness by Tr(∇²L(θ)) of the pre-training loss. The Hessian of even a tiny language
model has ~10¹¹ entries, so the trace is estimated with Hutchinson's identity (Hutchinson 1990):

    Tr(H) = E_v[vᵀ H v]   for v with i.i.d. Rademacher (±1) entries,

since E[v vᵀ] = I. Each vᵀHv needs one Hessian-vector product, Hv = ∇_θ(∇_θL · v), i.e. a second backward
pass through the graph of the first (`create_graph=True`); the graph of ∇L is built once and reused by
every probe. The estimate is the mean over probes, reported with its standard error; for a quadratic
½θᵀAθ it is exact in expectation, with variance 2 Σ_{i≠j} A_ij² per probe (only off-diagonal terms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TraceEstimate:
    mean: float
    stderr: float
    samples: tuple[float, ...]


def rademacher_like(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype).mul_(2).sub_(1) for p in params]


def gradient_graph(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """∇L with its own graph kept, so Hessian-vector products can differentiate through it."""
    return torch.autograd.grad(loss, params, create_graph=True)


def hessian_vector_product(
    grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """H v = ∇_θ(∇L · v), from the gradient graph `grads` (which is kept for further products)."""
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return torch.autograd.grad(dot, params, retain_graph=True)


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], probes: int, generator: torch.Generator
) -> TraceEstimate:
    """Tr ∇²L at the current parameters from `probes` Rademacher vectors (mean ± standard error)."""
    if probes < 1:
        raise ValueError("probes must be at least 1")
    params = [p for p in params if p.requires_grad]
    grads = gradient_graph(loss_fn(), params)
    samples = []
    for _ in range(probes):
        v = rademacher_like(params, generator)
        hv = hessian_vector_product(grads, params, v)
        samples.append(float(sum((a * b).sum() for a, b in zip(v, hv))))
    mean = sum(samples) / probes
    var = sum((s - mean) ** 2 for s in samples) / (probes - 1) if probes > 1 else float("nan")
    return TraceEstimate(mean, math.sqrt(var / probes), tuple(samples))
