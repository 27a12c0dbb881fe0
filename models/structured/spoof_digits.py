"""Spoofed digits: a face-anti-spoofing stand-in built from scikit-learn's digits (built-in `spoof-digits`).

Each 8×8 digit, bilinearly upsampled to 16×16, appears once live and once per presentation attack, each
attack a generated imitation of what a spoof does to a face image (all reconstructed, seeded):

- print: a 3×3 box blur, contrast compressed to [0.2, 0.75] and paper texture (Gaussian noise, σ = 0.04);
- replay: a screen's moiré, 0.12·sin(2π(f₁u + f₂v) + φ) with random frequencies and phase, and gamma 0.6;
- mask: an occluder, a random 6×6 to 9×9 patch set to a flat grey in [0.3, 0.6];
- quantisation: re-encoding to 4 grey levels on 2×2 blocks.

Labels: 0 live, 1 print, 2 replay, 3 mask, 4 quantisation; `digit` holds the class of the underlying digit.
Splits follow the digits' own stratified 60/20/20 split, so every version of a digit is in the same split
(a one-class method trains on the live images of `train`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets import Dataset, DatasetInfo, Split, load_builtin, register_builtin

ATTACKS = ("print", "replay", "mask", "quantisation")
CLASSES = ("live", *ATTACKS)
SIZE = 16


def upsample(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """[N, 1, 8, 8] → [N, 1, size, size], bilinear."""
    return F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False).numpy()


def print_attack(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = F.avg_pool2d(torch.from_numpy(x), 3, stride=1, padding=1, count_include_pad=False).numpy()
    return np.clip(0.2 + 0.55 * blurred + rng.normal(0.0, 0.04, x.shape), 0.0, 1.0)


def replay_attack(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    u, v = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    f = rng.uniform(3.0, 6.0, size=(n, 2, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    moire = 0.12 * np.sin(2 * np.pi * (f[:, 0] * u + f[:, 1] * v) + phase)[:, None]
    return np.clip(x**0.6 + moire, 0.0, 1.0)


def mask_attack(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    n, _, h, w = x.shape
    for i in range(n):
        size = int(rng.integers(6, 10))
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out[i, :, top : top + size, left : left + size] = rng.uniform(0.3, 0.6)
    return out


def quantisation_attack(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blocks = F.avg_pool2d(torch.from_numpy(x), 2).numpy()
    levels = np.round(blocks * 3) / 3
    return np.repeat(np.repeat(levels, 2, axis=2), 2, axis=3)


TRANSFORMS = {"print": print_attack, "replay": replay_attack, "mask": mask_attack, "quantisation": quantisation_attack}


def build_spoof_digits(seed: int = 0) -> Dataset:
    digits = load_builtin("digits")
    rng = np.random.default_rng(seed)
    splits = {}
    for name, split in digits.splits.items():
        live = upsample(np.asarray(split["x"], dtype=np.float32))
        versions = [live] + [TRANSFORMS[a](live, rng).astype(np.float32) for a in ATTACKS]
        n = len(live)
        splits[name] = Split(
            {
                "x": np.concatenate(versions),
                "y": np.repeat(np.arange(len(CLASSES), dtype=np.int64), n),
                "digit": np.tile(np.asarray(split["y"], dtype=np.int64), len(CLASSES)),
            }
        )
    return Dataset("spoof-digits", "image-class", splits, {"num_classes": len(CLASSES), "classes": list(CLASSES)})


register_builtin(
    DatasetInfo(
        "spoof-digits",
        "image-class",
        "16×16 digits, live and under four generated presentation attacks (print, replay, mask, quantisation)",
        "builtin",
        {"num_classes": len(CLASSES), "shape": [1, SIZE, SIZE], "size": 1797 * len(CLASSES)},
    ),
    build_spoof_digits,
)
