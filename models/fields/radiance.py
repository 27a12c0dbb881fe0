"""Radiance fields of three architectures sharing one interface, as progressive volume distillation needs.

Every architecture's geometry part ends in the same k = 16-dimensional feature h(x) — the "volume-aligned
feature": channel 0 is the pre-activation density, channels 1..15 feed a small colour head (15 → 32 → 3,
sigmoid). Density is σ = trunc_exp(h₀)/30 (exp forward; the backward clamps the exponent at 15, as torch-ngp's
`trunc_exp`), optionally with h₀ clamped to [−2, 7] first (PVD's fix for densities whose ranges differ wildly
between architectures). The 1/30 is a choice of length unit: torch-ngp skips empty space with an occupancy grid,
our renderer samples all of [near, far], and with σ = e^{−2} there a 3.2-long ray would lose a third of its light;
at e^{−2}/30 it loses 1.4%, while e^{7}/30 ≈ 37 still makes a 0.2-thick shell opaque. The colour is
view-independent (the scene is diffuse).

- `hash_field`: multiresolution hash grid (8 levels, 2¹⁴ entries, 2 features) → tiny MLP (16 → 64 → 16): the
  Instant-NGP-style teacher.
- `mlp_field`: NeRF positional encoding (6 frequencies) → 4 × 64 ReLU layers → 16: the NeRF-style student.
- `dense_field`: a 32³ grid of the 16 features, read trilinearly (a Plenoxels/DVGO-style voxel field).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.fields.encoding import positional_encoding, positional_encoding_dim
from models.fields.grids import DenseGrid, HashGrid
from models.fields.scene import to_unit_cube

FEATURE_DIM = 16
DENSITY_CLAMP = (-2.0, 7.0)
DENSITY_UNIT = 1 / 30  # σ = trunc_exp(h₀) · DENSITY_UNIT, see the module docstring


class _TruncExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def clamp_density(features: torch.Tensor) -> torch.Tensor:
    """h with its density channel clamped to [−2, 7] (the other channels untouched), as the reference's forward."""
    return torch.cat([features[..., :1].clamp(*DENSITY_CLAMP), features[..., 1:]], dim=-1)


class RadianceField(nn.Module):
    def __init__(self, geometry: nn.Module):
        super().__init__()
        self.geometry = geometry
        self.colour_head = nn.Sequential(nn.Linear(FEATURE_DIM - 1, 32), nn.ReLU(), nn.Linear(32, 3))

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """World points [..., 3] → h [..., 16], unclamped."""
        return self.geometry(to_unit_cube(points))

    def density_and_colour(self, features: torch.Tensor, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """σ = trunc_exp(h₀, clamped to [−2, 7] when `clamp`)·unit and the colour head's RGB."""
        density = features[..., 0].clamp(*DENSITY_CLAMP) if clamp else features[..., 0]
        return trunc_exp(density) * DENSITY_UNIT, torch.sigmoid(self.colour_head(features[..., 1:]))

    def forward(self, points: torch.Tensor, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.density_and_colour(self.features(points), clamp)


class PositionalMLP(nn.Module):
    def __init__(self, frequencies: int = 6, width: int = 64, depth: int = 4):
        super().__init__()
        self.frequencies = frequencies
        widths = [positional_encoding_dim(3, frequencies)] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, FEATURE_DIM))

    def forward(self, points01: torch.Tensor) -> torch.Tensor:
        return self.net(positional_encoding(points01 * 2 - 1, self.frequencies))


def hash_field(generator: torch.Generator) -> RadianceField:
    grid = HashGrid(generator)
    return RadianceField(nn.Sequential(grid, nn.Linear(grid.out_dim, 64), nn.ReLU(), nn.Linear(64, FEATURE_DIM)))


def mlp_field(frequencies: int = 6, width: int = 64, depth: int = 4) -> RadianceField:
    return RadianceField(PositionalMLP(frequencies, width, depth))


def dense_field(generator: torch.Generator, resolution: int = 32) -> RadianceField:
    return RadianceField(DenseGrid(resolution, FEATURE_DIM, generator))


ARCHITECTURES = ("hash", "mlp", "dense")


def build_field(architecture: str, generator: torch.Generator) -> RadianceField:
    if architecture == "hash":
        return hash_field(generator)
    if architecture == "mlp":
        return mlp_field()
    if architecture == "dense":
        return dense_field(generator)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def save_field(field: RadianceField, architecture: str, folder: Path) -> Path:
    """The field as a model folder: `field.safetensors` and its architecture in `field.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in field.state_dict().items()}, str(folder / "field.safetensors"))
    (folder / "field.json").write_text(json.dumps({"architecture": architecture}))
    return folder


def load_field(folder: Path) -> RadianceField:
    architecture = json.loads((folder / "field.json").read_text())["architecture"]
    field = build_field(architecture, torch.Generator().manual_seed(0))
    field.load_state_dict(load_file(str(folder / "field.safetensors")))
    return field.eval()
