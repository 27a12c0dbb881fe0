"""Sparse Spectral Training (SST): train every linear layer in its SVD basis, a few singular vectors at a time.

Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks"
(arXiv 2405.15481v2), Section 4. Each weight W ∈ R^{m×n} is re-parametrised as U diag(Σ) Vᵀ from the
SVD of W₀ (k = min(m, n), so the model is unchanged at initialisation). With G = ∂L/∂W:

- Σ is always updated, with ∂L/∂Σ_i = U_iᵀ G V_i (Eq. 4), then clamped to Σ ≥ 0;
- only r sampled columns of U and V are updated, with the "enhanced" gradients G V_i and Gᵀ U_i
  (Eq. 5: the σ_i factor of the true gradient is dropped, so small singular directions still move),
  then renormalised to unit length;
- columns are sampled without replacement with p(i) = ½(1/k + Σ_i/ΣΣ) (Eq. 6: half uniform, half by
  singular value) at the start of each iteration of T₃ steps, which resets their Adam state;
- after a round of k/r iterations, W is re-decomposed by SVD (U, V orthonormal again; the product,
  i.e. the function, unchanged).

`SSTLinear` computes the enhanced gradients in a custom autograd function; `SSTAdam` holds Adam state
for Σ and for the r active columns only (that is SST's memory saving) and performs sampling and re-SVD.
The official code was not available; this follows the paper's text. Reconstructed choices: the Σ
moments survive iteration resets (the paper resets "the optimizer state" of the sampled vectors);
weight decay is not applied to U, V, Σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.optim.moments import SubspaceOptimizer, adam_direction, evaluate_closure


class _EnhancedSpectralLinear(torch.autograd.Function):
    """y = x (U diag(s) Vᵀ)ᵀ with SST's gradients: ∂U = G V, ∂V = Gᵀ U, ∂s_i = U_iᵀ G V_i."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weight = (u * s) @ v.T
        ctx.save_for_backward(x, u, s, v, weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, u, s, v, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # ∂L/∂W, m×n
        gv = g @ v
        return grad_out @ weight, gv, (u * gv).sum(0), g.T @ u


class SSTLinear(nn.Module):
    """A linear layer stored as U diag(s) Vᵀ (plus the original bias), trained by `SSTAdam`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.u = nn.Parameter(u.to(weight.dtype))
        self.s = nn.Parameter(s.to(weight.dtype))
        self.v = nn.Parameter(vh.T.contiguous().to(weight.dtype))
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SSTLinear:
        return cls(linear.weight, linear.bias)

    def dense_weight(self) -> torch.Tensor:
        return (self.u * self.s) @ self.v.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _EnhancedSpectralLinear.apply(x, self.u, self.s, self.v)
        return out if self.bias is None else out + self.bias


def to_sst(model: nn.Module, exclude: tuple[str, ...] = ("lm_head", "embed")) -> nn.Module:
    """Swap every `nn.Linear` not named in `exclude` for an `SSTLinear` of the same function, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(e in full for e in exclude):
                setattr(module, child_name, SSTLinear.from_linear(child))
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Fold every `SSTLinear` back into an `nn.Linear` (for export: a standard checkpoint)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SSTLinear):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    dense.weight.copy_(child.dense_weight())
                    if child.bias is not None:
                        dense.bias = child.bias
                setattr(module, child_name, dense)
    return model


def sampling_probabilities(s: torch.Tensor) -> torch.Tensor:
    """Eq. 6: p(i) = ½(1/k + Σ_i/ΣΣ) — every direction has a floor, large ones are favoured."""
    k = s.numel()
    total = s.clamp_min(0).sum()
    by_value = s.clamp_min(0) / total if total > 0 else torch.full_like(s, 1.0 / k)
    return 0.5 * (1.0 / k + by_value)


@torch.no_grad()
def resvd(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
    """Re-decompose U diag(s) Vᵀ in place: orthonormal factors, same product."""
    u_new, s_new, vh_new = torch.linalg.svd((u * s) @ v.T, full_matrices=False)
    u.copy_(u_new)
    s.copy_(s_new)
    v.copy_(vh_new.T)


class SSTAdam(SubspaceOptimizer):
    """Adam for SST: every `SSTLinear`'s (U, V, Σ) in its own group, any other parameter in AdamW groups.

    Build it with `SSTAdam.for_model(model, rank=r, ...)`. `iteration_steps` is T₃; a round is
    ⌈k/r⌉ iterations and ends with a re-SVD.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 16,
        iteration_steps: int = 200,
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            iteration_steps=iteration_steps,
            sst=False,
        )
        super().__init__(params, defaults, seed)
        if any(g["sst"] and len(g["params"]) != 3 for g in self.param_groups):
            raise ValueError("an SST group holds exactly (u, s, v) of one SSTLinear")

    @classmethod
    def for_model(cls, model: nn.Module, **kw: Any) -> SSTAdam:
        sst = [m for m in model.modules() if isinstance(m, SSTLinear)]
        spectral = {id(p) for m in sst for p in (m.u, m.s, m.v)}
        regular = [p for p in model.parameters() if p.requires_grad and id(p) not in spectral]
        groups = [{"params": [m.u, m.s, m.v], "sst": True} for m in sst]
        return cls(([{"params": regular, "sst": False}] if regular else []) + groups, **kw)

    # -- iterations and rounds ------------------------------------------------------------------
    def _begin_iteration(self, group: dict[str, Any]) -> None:
        u, s, v = group["params"]
        k = s.numel()
        r = min(group["rank"], k)
        iteration = group["step"] // group["iteration_steps"]
        if iteration > 0 and iteration % math.ceil(k / r) == 0:
            resvd(u, s, v)
        active = torch.multinomial(
            sampling_probabilities(s.detach()), r, replacement=False, generator=self._generator
        ).to(s.device)
        state = self.state[u]
        state.clear()
        state.update(
            indices=active,
            step=0,
            m_u=u.new_zeros(u.shape[0], r),
            v_u=u.new_zeros(u.shape[0], r),
            m_v=v.new_zeros(v.shape[0], r),
            v_v=v.new_zeros(v.shape[0], r),
        )

    def _sst_step(self, group: dict[str, Any]) -> None:
        u, s, v = group["params"]
        betas, eps, lr = group["betas"], group["eps"], group["lr"]
        if s.grad is not None:
            state = self.state[s]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(s), exp_avg_sq=torch.zeros_like(s))
            state["step"] += 1
            s.sub_(lr * adam_direction(s.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], betas, eps))
            s.clamp_(min=0.0)
        state = self.state[u]
        idx = state["indices"]
        state["step"] += 1
        for factor, m, sq in ((u, "m_u", "v_u"), (v, "m_v", "v_v")):
            if factor.grad is None:
                continue
            columns = factor[:, idx] - lr * adam_direction(
                factor.grad[:, idx], state[m], state[sq], state["step"], betas, eps
            )
            factor[:, idx] = F.normalize(columns, dim=0)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            if group["sst"]:
                if group["step"] % group["iteration_steps"] == 0:
                    self._begin_iteration(group)
                group["step"] += 1
                self._sst_step(group)
                continue
            group["step"] += 1
            for p in group["params"]:
                if p.grad is not None:
                    self.adamw_update(p, group)
        return loss
