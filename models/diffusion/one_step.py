"""The one-step generator of a distilled diffusion student (SwiftBrush / SNOOPI's PG-SB).

The student keeps the teacher's U-Net shape and reads one fixed timestep T: from noise z it
predicts x̂₀ = (z − σ_T ε(z, T, c)) / α_T with α_T² = ᾱ_T. SwiftBrush (Nguyen & Tran, CVPR 2024)
takes Stable Diffusion's last timestep, whose ᾱ is 0.0047; the sampler (`models.diffusion.sampling`)
and the distillation loop (`models.diffusion.vsd`) both build it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

REFERENCE_ALPHA_BAR_T = 0.0047  # SwiftBrush's α_T² (SD's ᾱ at t = 999)


def student_timestep(alphas_cumprod: torch.Tensor, alpha_bar: float = REFERENCE_ALPHA_BAR_T) -> int:
    """The timestep whose ᾱ is nearest the reference's ᾱ_T."""
    return int((alphas_cumprod - alpha_bar).abs().argmin())


@dataclass(frozen=True)
class OneStep:
    """The one-step generator's fixed input timestep T and its α_T, σ_T."""

    timestep: int
    alpha: float
    sigma: float

    @classmethod
    def for_schedule(cls, alphas_cumprod: torch.Tensor, alpha_bar: float = REFERENCE_ALPHA_BAR_T) -> OneStep:
        t = student_timestep(alphas_cumprod, alpha_bar)
        a = float(alphas_cumprod[t])
        return cls(t, math.sqrt(a), math.sqrt(1 - a))

    def generate(self, unet: UNet2DConditionModel, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (z − σ_T ε(z, T, c)) / α_T."""
        t = torch.full((len(noise),), self.timestep, dtype=torch.long, device=noise.device)
        return (noise - self.sigma * unet(noise, t, encoder_hidden_states=cond).sample) / self.alpha
