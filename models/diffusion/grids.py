"""Sample grids as PNG bytes (for `ctx.save_artifact(..., kind="image")`) and labelled figures.

`image_grid` tiles images with a 1-px gutter and upsamples by nearest neighbour so 16×16 digits are
visible; `labelled_grids` puts several grids side by side with titles (e.g. CFG vs APG per scale)
on a matplotlib `Figure` (no pyplot, as `models.plots`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image


def tile(images01: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [0, 1] → one HWC uint8 array."""
    n, c, h, w = images01.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images01.clamp(0, 1)):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr[..., 0] if c == 1 else arr


def image_grid(images01: torch.Tensor, nrow: int | None = None, scale: int = 4) -> bytes:
    """PNG bytes of a grid of images, each pixel shown as scale×scale."""
    arr = tile(images01, nrow)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def labelled_grids(grids: Mapping[str, torch.Tensor], nrow: int = 8, ncols: int = 4, title: str = "") -> Figure:
    """One titled panel per grid (e.g. "CFG w=8", "APG w=8")."""
    ncols = max(1, min(ncols, len(grids)))
    nrows = math.ceil(len(grids) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, images) in zip(axes, grids.items()):
        ax.imshow(tile(images, nrow), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for ax in axes[len(grids) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
