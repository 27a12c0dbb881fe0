"""Coordinate encodings that let an MLP fit high frequencies.

- Random Fourier features (Tancik et al., "Fourier Features Let Networks Learn High Frequency Functions in Low
  Dimensional Domains", NeurIPS 2020): γ(x) = [sin(2π·σ·Bx), cos(2π·σ·Bx)], B ~ N(0, 1)^{F×d} fixed, for x in
  [0, 1]^d (the CAM reference's `RandFourierFeature` with scale −1, i.e. unscaled).
- NeRF's positional encoding (Mildenhall et al., ECCV 2020): γ(x) = [x, sin(2^k π x), cos(2^k π x)]_{k<L}.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierFeatures(nn.Module):
    def __init__(self, in_dim: int, frequencies: int, sigma: float, generator: torch.Generator):
        super().__init__()
        self.register_buffer("projection", torch.randn(in_dim, frequencies, generator=generator) * 2 * math.pi * sigma)
        self.out_dim = 2 * frequencies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = x @ self.projection
        return torch.cat([phase.sin(), phase.cos()], dim=-1)


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[..., d] → [..., d·(1 + 2L)]: the input, then sines and cosines at 2^k π, k = 0..L−1."""
    scales = (2.0 ** torch.arange(frequencies, dtype=x.dtype)) * math.pi
    phase = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, phase.sin(), phase.cos()], dim=-1)


def positional_encoding_dim(in_dim: int, frequencies: int) -> int:
    return in_dim * (1 + 2 * frequencies)
