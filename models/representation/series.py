"""Multivariate time series for contrastive learning: a generator with labelled bad positive pairs,
TS-TCC's weak and strong views, and a small 1-D CNN encoder.

`bad_pair_series` makes DBPM's offline set: each series carries a class motif (a windowed
sinusoid with a class-specific frequency and channel mix) at a random position over background
noise. A fraction of the training series are *noisy* pairs (the signal is replaced by an artefact —
a large per-channel offset plus noise — so both views carry nothing of the class, yet are easy to
match to each other) and a fraction are *faulty* pairs (the strong view destroys
the motif: it is built from noise), as in Lan et al. (ICLR 2024), Sec. 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

CLEAN, NOISY, FAULTY = 0, 1, 2


@dataclass(frozen=True)
class BadPairSeries:
    x: torch.Tensor  # [N, C, L]
    y: torch.Tensor  # [N] motif class
    kind: torch.Tensor  # [N] CLEAN / NOISY / FAULTY


def bad_pair_series(
    n: int,
    classes: int = 5,
    channels: int = 3,
    length: int = 64,
    noisy: float = 0.1,
    faulty: float = 0.1,
    seed: int = 0,
) -> BadPairSeries:
    rng = np.random.default_rng(seed)
    t = np.arange(24) / 24.0
    mix = np.random.default_rng(1234).normal(size=(classes, channels))  # class → channel weights, fixed
    y = rng.integers(0, classes, n)
    x = 0.5 * rng.normal(size=(n, channels, length))
    for i in range(n):
        start = rng.integers(0, length - len(t))
        motif = np.sin(2 * np.pi * (1 + y[i]) * t) * np.hanning(len(t))
        x[i, :, start : start + len(t)] += mix[y[i]][:, None] * motif[None]
    kind = np.full(n, CLEAN)
    order = rng.permutation(n)
    n_noisy, n_faulty = int(round(noisy * n)), int(round(faulty * n))
    kind[order[:n_noisy]] = NOISY
    kind[order[n_noisy : n_noisy + n_faulty]] = FAULTY
    # a noisy series is all artefact: a large per-channel offset (its fingerprint) plus white noise
    k = int((kind == NOISY).sum())
    x[kind == NOISY] = 3.0 * rng.normal(size=(k, channels, 1)) + rng.normal(size=(k, channels, length))
    return BadPairSeries(torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(kind))


def weak_view(x: torch.Tensor, generator: torch.Generator, sigma: float = 1.1) -> torch.Tensor:
    """TS-TCC scaling: every channel times a factor ~ N(2, σ²)."""
    return x * (2.0 + sigma * torch.randn(x.shape[0], x.shape[1], 1, generator=generator))


def strong_view(x: torch.Tensor, generator: torch.Generator, max_segments: int = 8, sigma: float = 0.8) -> torch.Tensor:
    """TS-TCC permutation (split into ≤ `max_segments` random segments, shuffled) + jitter N(0, σ²)."""
    out = torch.empty_like(x)
    length = x.shape[-1]
    for i in range(len(x)):
        pieces = int(torch.randint(1, max_segments + 1, (1,), generator=generator))
        cuts = torch.sort(torch.randperm(length - 1, generator=generator)[: pieces - 1] + 1).values.tolist()
        segments = torch.tensor_split(x[i], cuts, dim=-1)
        out[i] = torch.cat([segments[j] for j in torch.randperm(len(segments), generator=generator)], dim=-1)
    return out + sigma * torch.randn(x.shape, generator=generator)


class SeriesEncoder(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a global average pool (a small TS-TCC/ResNet-1D stand-in)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for out in (width // 2, width, width):
            layers += [nn.Conv1d(c, out, 7, padding=3), nn.BatchNorm1d(out), nn.ReLU(), nn.MaxPool1d(2)]
            c = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
