"""Deterministic attribute readers for coloured digits: which named colour each image is painted in.

The data paints every digit in one of `data.COLOURS` (hues 0°, 60°, …, 300°, jittered ±10°) on a
black background, so a pixel's colour name is the nearest named hue of its HSV hue, read only on
foreground pixels (value above `ink_threshold`) that carry colour (saturation above
`min_saturation`). SNOOPI's NASA reproduction uses these to count how often a negative prompt's
colour still appears — the stand-in for the paper's attribute-removal success rate (Tab. 2).
"""

from __future__ import annotations

import torch

from models.diffusion.data import COLOURS, HUES


def pixel_hue(images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue in degrees [0, 360), saturation, value) per pixel of [N, 3, H, W] RGB in [0, 1]."""
    r, g, b = images01.clamp(0, 1).unbind(1)
    v, _ = images01.clamp(0, 1).max(dim=1)
    c = v - images01.clamp(0, 1).min(dim=1).values
    s = c / v.clamp_min(1e-6)
    safe = c.clamp_min(1e-6)
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (h * 60.0) % 360.0, s, v


def pixel_colours(images01: torch.Tensor, ink_threshold: float = 0.25, min_saturation: float = 0.2) -> torch.Tensor:
    """Index into `COLOURS` of each pixel's nearest named hue, −1 for background or grey pixels."""
    hue, s, v = pixel_hue(images01)
    centres = torch.tensor(HUES, dtype=hue.dtype)
    dist = (hue[..., None] - centres).abs()
    nearest = torch.minimum(dist, 360 - dist).argmin(-1)
    return torch.where((v > ink_threshold) & (s > min_saturation), nearest, torch.full_like(nearest, -1))


def colour_shares(images01: torch.Tensor) -> torch.Tensor:
    """[N, len(COLOURS)]: per image, the fraction of its coloured foreground pixels of each colour."""
    idx = pixel_colours(images01).flatten(1)
    counts = torch.stack([(idx == k).sum(1) for k in range(len(COLOURS))], 1).float()
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def dominant_colour(images01: torch.Tensor) -> torch.Tensor:
    """Index of each image's most frequent named colour (−1 when it has no coloured foreground)."""
    shares = colour_shares(images01)
    return torch.where(shares.sum(1) > 0, shares.argmax(1), torch.full((len(shares),), -1))
