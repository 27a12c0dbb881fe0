"""Discrete images for lossless coding: scikit-learn's 8×8 digits as 17 grey levels (0–16, D = 64) and a 16×16
variant (bilinear ×2, re-quantised to the same 17 levels, D = 256) for the scaling study.

The split is the built-in `digits` dataset's: train + val (1,437 images) to fit, test (360) to code, so every
codec here sees the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets import Dataset, load_builtin

DIGIT_LEVELS = 17  # sklearn's digits count ink in 4×4 blocks of a 32×32 bitmap: 0..16


@dataclass(frozen=True)
class DiscreteImages:
    """Images as integer symbols: `train` and `test` are [N, D] int64 in 0..levels−1, row-major pixels."""

    train: torch.Tensor
    test: torch.Tensor
    levels: int
    side: int

    @property
    def num_pixels(self) -> int:
        return self.side * self.side


def quantize(images01: np.ndarray, levels: int, side: int) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] → [N, side²] symbols; resized bilinearly first when H ≠ side."""
    x = torch.from_numpy(np.asarray(images01, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * (levels - 1)).round().long().flatten(1)


def discrete_images(dataset: Dataset | None = None, side: int = 8, levels: int = DIGIT_LEVELS) -> DiscreteImages:
    """Train (train + val) and test symbols of an image dataset (default: the built-in digits)."""
    ds = dataset if dataset is not None else load_builtin("digits")
    fit = np.concatenate([np.asarray(ds.train["x"]), np.asarray(ds.val["x"])])
    return DiscreteImages(quantize(fit, levels, side), quantize(np.asarray(ds.test["x"]), levels, side), levels, side)
