"""Synthetic label noise for robustness experiments, injected into a training split only.

The two corruption models are the ones of the label-noise literature and of the LDR paper's code
(Zhu, Ying & Yang, ICML 2023, `utils.py`):

- uniform: with probability ρ a label is replaced by a class drawn uniformly from all K classes
  (so it may land on the true class again; the expected flip rate is ρ(K−1)/K);
- class-dependent: with probability ρ a label y becomes (y + 1) mod K, a fixed pairwise confusion
  that stays learnable only while ρ < 0.5.

Noise is a pure function of (labels, ρ, kind, seed), so a resumed job sees the same corruption.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

NoiseType = Literal["uniform", "class-dependent"]


def inject_label_noise(
    labels: np.ndarray, num_classes: int, rate: float, kind: NoiseType = "uniform", seed: int = 0
) -> np.ndarray:
    """A corrupted copy of `labels`; the input is left untouched."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    y = np.asarray(labels, dtype=np.int64).copy()
    rng = np.random.default_rng([seed, 0x1ABE1])  # a stream of its own, apart from model init and batching
    hit = rng.random(len(y)) < rate
    if kind == "uniform":
        y[hit] = rng.integers(0, num_classes, size=int(hit.sum()))
    elif kind == "class-dependent":
        y[hit] = (y[hit] + 1) % num_classes
    else:
        raise ValueError(f"noise type must be 'uniform' or 'class-dependent', got {kind!r}")
    return y
