"""Explicit 3-D feature grids, read by trilinear interpolation at points of the unit cube [0, 1]³.

- `DenseGrid`: a [C, R, R, R] voxel grid through `F.grid_sample` (align_corners=True).
- `HashGrid`: Instant-NGP's multiresolution hash encoding (Müller et al., "Instant Neural Graphics Primitives with
  a Multiresolution Hash Encoding", SIGGRAPH 2022), in plain PyTorch instead of tiny-cuda-nn. Level l has
  resolution N_l = ⌊N_min · b^l⌋ with b = exp((ln N_max − ln N_min)/(L − 1)); each of a point's 8 surrounding
  vertices v is looked up in that level's table of T entries × F features, directly (v_x + v_y·(N_l+1) +
  v_z·(N_l+1)²) while (N_l + 1)³ ≤ T and by the spatial hash (v_x·1 ⊕ v_y·2654435761 ⊕ v_z·805459861) mod T
  (uint32 arithmetic) above; the 8 features are blended trilinearly and the L levels concatenated. Tables start
  in U(−10⁻⁴, 10⁻⁴), as the paper's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)
CORNERS = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


class DenseGrid(nn.Module):
    def __init__(self, resolution: int, features: int, generator: torch.Generator, init_scale: float = 0.1):
        super().__init__()
        self.grid = nn.Parameter(
            torch.randn(features, resolution, resolution, resolution, generator=generator) * init_scale
        )
        self.out_dim = features

    def forward(self, points01: torch.Tensor) -> torch.Tensor:
        """[..., 3] in [0, 1] → [..., C]."""
        flat = points01.reshape(1, -1, 1, 1, 3) * 2 - 1
        out = F.grid_sample(self.grid[None], flat, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0, :, :, 0, 0].T.reshape(*points01.shape[:-1], -1)


class HashGrid(nn.Module):
    def __init__(
        self,
        generator: torch.Generator,
        levels: int = 8,
        table_size: int = 2**14,
        features: int = 2,
        min_resolution: int = 16,
        max_resolution: int = 128,
    ):
        super().__init__()
        growth = math.exp((math.log(max_resolution) - math.log(min_resolution)) / max(1, levels - 1))
        self.resolutions = [math.floor(min_resolution * growth**level) for level in range(levels)]
        self.table_size = table_size
        self.tables = nn.Parameter((torch.rand(levels, table_size, features, generator=generator) * 2 - 1) * 1e-4)
        self.out_dim = levels * features

    def vertex_index(self, vertices: torch.Tensor, level: int) -> torch.Tensor:
        """[..., 3] integer vertices → table rows: dense while the level fits the table, hashed above."""
        side = self.resolutions[level] + 1
        if side**3 <= self.table_size:
            return vertices[..., 0] + vertices[..., 1] * side + vertices[..., 2] * side * side
        hashed = torch.zeros_like(vertices[..., 0])
        for axis, prime in enumerate(HASH_PRIMES):
            hashed = hashed ^ ((vertices[..., axis] * prime) & 0xFFFFFFFF)
        return hashed % self.table_size

    def forward(self, points01: torch.Tensor) -> torch.Tensor:
        """[..., 3] in [0, 1] → [..., L·F]."""
        x = points01.clamp(0, 1)
        out = []
        for level, resolution in enumerate(self.resolutions):
            scaled = x * resolution
            base = scaled.floor().clamp(max=resolution - 1)
            frac = scaled - base
            vertices = base.long()[..., None, :] + CORNERS  # [..., 8, 3]
            weights = torch.where(CORNERS.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(-1)  # [..., 8]
            values = self.tables[level][self.vertex_index(vertices, level)]  # [..., 8, F]
            out.append((weights[..., None] * values).sum(-2))
        return torch.cat(out, dim=-1)
