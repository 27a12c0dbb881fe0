"""Learnable feature grids read at continuous coordinates by bilinear interpolation (`F.grid_sample`,
align_corners=True: grid node (0, 0) sits at coordinate 0 and node (W−1, H−1) at 1, so a coordinate on a node
returns that node's value exactly; border padding outside [0, 1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_grid(grid: torch.Tensor, coords01: torch.Tensor) -> torch.Tensor:
    """grid [C, H, W], coords [N, 2] as (x, y) in [0, 1] → [N, C]."""
    where = (coords01 * 2 - 1).view(1, -1, 1, 2)
    return F.grid_sample(grid[None], where, mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0].T


class ModulationGrid(nn.Module):
    """A [channels, H, W] grid of per-coordinate scalars starting at `initial` (one value per channel).

    The parameter holds the offset from `initial` (zero at the start), the same model as a grid holding the values
    themselves (equal gradients, equal Adam steps), but bilinear weights that sum to 1 only up to rounding then
    cannot move an untrained grid off its initial value: at initialisation s(x) = 1 and b(x) = 0 exactly."""

    def __init__(self, initial: tuple[float, ...], resolution: int = 32):
        super().__init__()
        self.register_buffer("initial", torch.tensor(initial, dtype=torch.float32))
        self.grid = nn.Parameter(torch.zeros(len(initial), resolution, resolution))

    def values(self) -> torch.Tensor:
        """The grid's current values, [channels, H, W]."""
        return self.initial[:, None, None] + self.grid

    def forward(self, coords01: torch.Tensor) -> torch.Tensor:
        return self.initial + sample_grid(self.grid, coords01)
