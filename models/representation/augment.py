"""Batched image views for contrastive learning on small grey images ([B, C, H, W] in [0, 1]).

SimCLR's recipe shrunk to digits: a random resized crop with rotation and translation (one affine
warp per image), Gaussian pixel noise and random erasing. Every draw comes from a
`torch.Generator`, so a checkpointed generator resumes the exact same views. `strength` scales the
whole recipe (0 ⇒ identity), which is what a hyper-parameter sweep varies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets import Dataset


@dataclass(frozen=True)
class ViewRecipe:
    """Ranges of the random transforms at strength 1; `ops` picks which are applied."""

    min_scale: float = 0.6  # crop side as a fraction of the image (zoom in by up to 1/0.6)
    max_rotation: float = 20.0  # degrees
    max_shift: float = 0.15  # fraction of the half-width
    noise_std: float = 0.1
    erase_prob: float = 0.5
    erase_max: float = 0.4  # erased square side as a fraction of the image
    ops: tuple[str, ...] = ("crop", "rotate", "noise", "erase")
    strength: float = 1.0


def random_view(x: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of each image of the batch."""
    b, _, h, w = x.shape
    s = recipe.strength

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=generator)

    scale = uniform(1.0 - s * (1.0 - recipe.min_scale), 1.0) if "crop" in recipe.ops else torch.ones(b)
    angle = uniform(-1, 1) * math.radians(s * recipe.max_rotation) if "rotate" in recipe.ops else torch.zeros(b)
    shift = uniform(-1, 1, b, 2) * s * recipe.max_shift if "crop" in recipe.ops else torch.zeros(b, 2)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    if "noise" in recipe.ops:
        out = out + s * recipe.noise_std * torch.randn(out.shape, generator=generator).to(out)
    if "erase" in recipe.ops:
        side = (uniform(0.0, s * recipe.erase_max) * min(h, w)).long()
        top = (torch.rand(b, generator=generator) * (h - side + 1)).long()
        left = (torch.rand(b, generator=generator) * (w - side + 1)).long()
        erase = torch.rand(b, generator=generator) < recipe.erase_prob
        rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        box = (
            (rows >= top[:, None, None])
            & (rows < (top + side)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + side)[:, None, None])
            & erase[:, None, None]
        )
        out = out.masked_fill(box[:, None].to(out.device), 0.0)
    return out.clamp(0.0, 1.0)


def image_splits(ds: Dataset, size: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) per split of an image-class dataset, bilinearly resized to size×size."""
    if ds.kind != "image-class":
        raise ValueError(f"representation methods need an 'image-class' dataset, got kind {ds.kind!r}")
    out = {}
    for name in ("train", "val", "test"):
        x = torch.from_numpy(np.ascontiguousarray(ds.splits[name]["x"], dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        if len(x) and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[name] = (x, torch.from_numpy(np.asarray(ds.splits[name]["y"], dtype=np.int64)))
    return out
