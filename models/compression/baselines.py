"""The codecs the circuit is measured against, all on the same test-set symbols.

- `IndependentPixels`: a categorical per pixel (counts + a total pseudocount of 1 per pixel), through the ANS
  coder: the model a PC must beat to show that its dependencies pay.
- `MADE`: an autoregressive MLP (Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML
  2015) over one-hot pixels in raster order, through the same coder: the neural codec of the speed comparison.
  Masks give hidden unit h a degree m(h) ∈ [1, D − 1] (cycled), input pixel i degree i; a hidden unit sees inputs of
  degree ≤ m(h) and output pixel i sees hidden units of degree < i, so p(x_i | x_<i) never reads x_≥i. Decoding
  costs one full forward per pixel.
- `byte_codecs`: zlib and lzma (strongest presets) on one byte per pixel, and PNG (Pillow, optimise on) of the
  test images tiled into one grey image — the generic lossless codecs.
"""

from __future__ import annotations

import io
import lzma
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.context import RunContext, stop_if_cancelled


class IndependentPixels:
    """p(x) = Π_i p_i(x_i), smoothed counts; a `SequentialModel` in raster order."""

    def __init__(self, train: torch.Tensor, levels: int, pseudocount: float = 1.0):
        counts = F.one_hot(train, levels).sum(0).to(torch.float64) + pseudocount / levels
        self.probs = counts / counts.sum(-1, keepdim=True)  # [D, K]
        self.order = tuple(range(train.shape[1]))
        self._n = 0

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs.log()[torch.arange(x.shape[1]), x].sum(-1)

    def start(self, n: int) -> None:
        self._n = n

    def pmf(self, var: int) -> torch.Tensor:
        return self.probs[var].expand(self._n, -1)

    def commit(self, var: int, values: torch.Tensor) -> None:
        pass


class MaskedLinear(nn.Linear):
    def __init__(self, fan_in: int, fan_out: int, mask: torch.Tensor):
        super().__init__(fan_in, fan_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """One-hot pixels in, K logits per pixel out; `pmf`/`commit` make it a `SequentialModel`."""

    def __init__(self, num_vars: int, levels: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.num_vars, self.levels = num_vars, levels
        in_degree = torch.arange(1, num_vars + 1).repeat_interleave(levels)
        degrees = [in_degree] + [torch.arange(hidden) % max(1, num_vars - 1) + 1 for _ in range(layers)]
        blocks: list[nn.Module] = []
        for before, after in zip(degrees[:-1], degrees[1:]):
            blocks += [MaskedLinear(len(before), len(after), (after[:, None] >= before[None, :]).float()), nn.ReLU()]
        out_mask = (in_degree[:, None] > degrees[-1][None, :]).float()
        self.net = nn.Sequential(*blocks, MaskedLinear(hidden, num_vars * levels, out_mask))
        self.order = tuple(range(num_vars))
        self._x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] symbols → [N, D, K] logits of p(x_i | x_<i)."""
        onehot = F.one_hot(x, self.levels).float().flatten(1)
        return self.net(onehot).view(len(x), self.num_vars, self.levels)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self(x).transpose(1, 2), x, reduction="none").sum(-1)

    def start(self, n: int) -> None:
        self._x = torch.zeros(n, self.num_vars, dtype=torch.long)

    @torch.no_grad()
    def pmf(self, var: int) -> torch.Tensor:
        assert self._x is not None
        return torch.softmax(self(self._x)[:, var].double(), dim=-1)

    def commit(self, var: int, values: torch.Tensor) -> None:
        assert self._x is not None
        self._x[:, var] = values


def train_made(
    ctx: RunContext, train: torch.Tensor, levels: int, seed: int, epochs: int = 60, hidden: int = 256
) -> MADE:
    """Adam (lr 1e-3, weight decay 1e-4), batch 128, `epochs` passes: a fixed budget, no tuning on the test set."""
    torch.manual_seed(seed)
    model = MADE(train.shape[1], levels, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        stop_if_cancelled(ctx)
        for batch in torch.randperm(len(train), generator=gen).split(128):
            loss = -model.log_likelihood(train[batch]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def tiled(x: torch.Tensor, side: int) -> np.ndarray:
    """[N, side²] symbols → one uint8 grey image, images in a near-square grid (zero padding)."""
    n = len(x)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * cols, side, side), dtype=np.uint8)
    canvas[:n] = x.numpy().astype(np.uint8).reshape(n, side, side)
    return canvas.reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, cols * side)


def byte_codecs(x: torch.Tensor, side: int) -> dict[str, int]:
    """Compressed sizes in bytes of the symbols x ([N, side²], one byte each) under zlib, lzma and PNG."""
    raw = x.numpy().astype(np.uint8).tobytes()
    png = io.BytesIO()
    Image.fromarray(tiled(x, side)).save(png, format="PNG", optimize=True)
    return {
        "zlib": len(zlib.compress(raw, 9)),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
        "png": len(png.getvalue()),
    }
