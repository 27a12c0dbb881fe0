"""Guidance rules as pure functions of the conditional and unconditional predictions (+ small state).

Both rules act on clean-image predictions D = x̂₀ (the APG paper works in this space; CFG gives the
same sampler in ε- or D-space because the map between them is affine for a fixed x_t and t).

* `cfg` — classifier-free guidance (Ho & Salimans 2022): D_g = D_u + w·(D_c − D_u).
* `apg` — adaptive projected guidance (Sadat et al., "Eliminating Oversaturation and Artifacts of
  High Guidance Scales in Diffusion Models", ICLR 2025, Alg. 1 / Eqs. 5–9):
      ΔD  = D_c − D_u
      ΔD̄_t = ΔD + β·ΔD̄_{t+1}                      (momentum, β < 0 in the paper; state per request)
      ΔD̄ ← ΔD̄·min(1, r/‖ΔD̄‖₂)                     (rescale, norm over C,H,W per sample)
      Δ∥ = (⟨ΔD̄, D_c⟩/‖D_c‖²)·D_c,  Δ⊥ = ΔD̄ − Δ∥  (projection onto the conditional prediction)
      D_g = D_c + (w − 1)·(Δ⊥ + η·Δ∥)
  With η = 1, r = ∞ and β = 0 this is CFG exactly; η = 0 keeps only the part of the update
  orthogonal to D_c, which is what stops the saturation growth. Projections are computed in float64
  as the reference (diffusers' `normalized_guidance`) does.

`GuidanceState` holds what a rule carries from step to step (APG's momentum buffer and the per-step
diagnostics); the sampling core creates one per request, so concurrent requests never share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GUIDANCE_RULES = ("none", "cfg", "apg")


def _dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.dim()))


def cfg(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: D_u + w·(D_c − D_u) (w = 1 is the conditional prediction)."""
    return d_uncond + scale * (d_cond - d_uncond)


@dataclass
class GuidanceState:
    """Per-request state: APG's momentum average ΔD̄ and per-step diagnostics for the response."""

    momentum: float = 0.0
    running: torch.Tensor | None = None
    diff_norm: list[float] = field(default_factory=list)
    parallel_fraction: list[float] = field(default_factory=list)

    def update_momentum(self, diff: torch.Tensor) -> torch.Tensor:
        """ΔD̄_t = ΔD + β·ΔD̄_{t+1}, starting from ΔD̄ = 0."""
        self.running = diff if self.running is None else diff + self.momentum * self.running
        return self.running


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of v with respect to `onto`, per sample, in float64."""
    v64, u64 = v.double(), onto.double()
    unit = torch.nn.functional.normalize(u64.flatten(1), dim=1).view_as(u64)
    parallel = (v64 * unit).sum(dim=_dims(v64), keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def apg(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    eta: float = 0.0,
    norm_threshold: float = math.inf,
    state: GuidanceState | None = None,
) -> torch.Tensor:
    """Adaptive projected guidance on clean-image predictions (paper's parameterisation).

    `norm_threshold` is the rescale radius r (inf or ≤ 0 disables it); `state.momentum` is β.
    """
    diff = d_cond - d_uncond
    if state is not None:
        diff = state.update_momentum(diff)
    if math.isfinite(norm_threshold) and norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1).view(-1, *([1] * (diff.dim() - 1)))
        diff = diff * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    parallel, orthogonal = project(diff, d_cond)
    if state is not None:
        total = diff.flatten(1).norm(dim=1)
        state.diff_norm.append(total.mean().item())
        state.parallel_fraction.append((parallel.flatten(1).norm(dim=1) / total.clamp_min(1e-12)).mean().item())
    return d_cond + (scale - 1) * (orthogonal + eta * parallel)


@dataclass(frozen=True)
class GuidanceSpec:
    """Which rule and its parameters: what a request names (`guidance_scale` is w)."""

    name: str = "cfg"
    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float = math.inf
    momentum: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)  # fraction of steps in which guidance is applied

    @property
    def needs_uncond(self) -> bool:
        return self.name != "none"

    def new_state(self) -> GuidanceState:
        return GuidanceState(momentum=self.momentum)

    def apply(
        self, d_cond: torch.Tensor, d_uncond: torch.Tensor | None, state: GuidanceState, step: int, num_steps: int
    ) -> torch.Tensor:
        lo, hi = self.interval
        if self.name == "none" or d_uncond is None or not (int(lo * num_steps) <= step < math.ceil(hi * num_steps)):
            return d_cond
        if self.name == "cfg":
            return cfg(d_cond, d_uncond, self.scale)
        if self.name == "apg":
            return apg(d_cond, d_uncond, self.scale, self.eta, self.norm_threshold, state)
        raise ValueError(f"unknown guidance rule {self.name!r}; known: {GUIDANCE_RULES}")
