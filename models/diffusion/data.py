"""Coloured 16×16 digits with prompt tokens [digit, colour, thickness], from scikit-learn's digits.

Each 8×8 digit is upsampled to 16×16, thinned or thickened, shifted by up to ±1 px and painted in
one of six named hues (jittered ±10°) with HSV saturation drawn from U(0.4, 0.7) on a black
background: the data every method of the family shares. Saturation in [0.4, 0.7] leaves room above it, so a guidance
rule that oversaturates (CFG at high scales, the APG paper's complaint) shows up in the mean
foreground saturation and in the clipped-pixel fraction.

A prompt is three token ids; each slot's last id is its *null* token. Training drops the whole
prompt with `null_prob` (what classifier-free guidance needs) and single attribute slots with
`attr_drop_prob`, so "a 3" alone (colour and thickness null) is a prompt the model has seen.
Images live in [-1, 1] for the model; `to_unit` maps them back to [0, 1].
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets.base import stratified_split

COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
THICKNESS = ("thin", "regular", "bold")
VOCAB = (10 + 1, len(COLOURS) + 1, len(THICKNESS) + 1)  # per slot, the last id is the null token
NULL = tuple(v - 1 for v in VOCAB)
SATURATION_RANGE = (0.4, 0.7)
IMAGE_SIZE = 16


@dataclass(frozen=True)
class ColouredDigits:
    """Images [N, 3, 16, 16] in [-1, 1], prompt tokens [N, 3] and the source digit index."""

    images: torch.Tensor
    tokens: torch.Tensor
    source: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 0]


def _ink(raw8: np.ndarray, thickness: np.ndarray, shifts: np.ndarray) -> torch.Tensor:
    """Ink masks in [0, 1], [N, 1, 16, 16]: upsampled, thinned/thickened, shifted."""
    x = torch.from_numpy(raw8.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    thin = ((x - 0.35) / 0.65).clamp(0, 1)
    bold = F.max_pool2d(x, 3, stride=1, padding=1)
    th = torch.from_numpy(thickness)[:, None, None, None]
    x = torch.where(th == 0, thin, torch.where(th == 2, bold, x))
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = torch.roll(x[i], shifts=(int(dy), int(dx)), dims=(1, 2))
    return out


def render(raw8: np.ndarray, digits: np.ndarray, rng: np.random.Generator) -> ColouredDigits:
    """Paint each 8×8 digit once with a random colour, thickness and shift."""
    n = len(raw8)
    colour = rng.integers(0, len(COLOURS), n)
    thickness = rng.integers(0, len(THICKNESS), n)
    shifts = rng.integers(-1, 2, (n, 2))
    hue = (np.asarray(HUES)[colour] + rng.uniform(-10, 10, n)) % 360
    sat = rng.uniform(*SATURATION_RANGE, n)
    rgb = np.array([colorsys.hsv_to_rgb(h / 360, s, 1.0) for h, s in zip(hue, sat)], dtype=np.float32)
    ink = _ink(raw8, thickness, shifts)
    images = ink * torch.from_numpy(rgb)[:, :, None, None]
    tokens = torch.from_numpy(np.stack([digits, colour, thickness], 1).astype(np.int64))
    return ColouredDigits(images * 2 - 1, tokens, torch.arange(n))


def coloured_digits(split: str = "train", variants: int = 4, seed: int = 0) -> ColouredDigits:
    """`variants` random paintings of every digit of a split (60/20/20 stratified, as `digits`);
    split "heldout" is val+test together (the real reference set for Fréchet distance)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    idx = stratified_split(raw.target.astype(np.int64), seed=0)
    which = np.concatenate([idx["val"], idx["test"]]) if split == "heldout" else idx[split]
    rng = np.random.default_rng(seed)
    parts = [render(raw.images[which], raw.target[which], rng) for _ in range(variants)]
    return ColouredDigits(
        torch.cat([p.images for p in parts]),
        torch.cat([p.tokens for p in parts]),
        torch.from_numpy(np.tile(which, variants)),
    )


def drop_tokens(
    tokens: torch.Tensor, null_prob: float, attr_drop_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Null-prompt dropout for classifier-free guidance plus per-attribute dropout."""
    null = torch.tensor(NULL, dtype=tokens.dtype)
    attr = torch.rand(tokens.shape, generator=generator) < attr_drop_prob
    attr[:, 0] = False  # the digit is dropped only with the whole prompt
    whole = (torch.rand(len(tokens), generator=generator) < null_prob)[:, None]
    return torch.where(attr | whole, null.expand_as(tokens), tokens)


def prompt_tokens(
    digit: int | None = None, colour: str | int | None = None, thickness: str | int | None = None
) -> list[int]:
    """Token ids of a prompt given by names; None means the slot's null token."""

    def slot(value: str | int | None, names: tuple[str, ...] | None, k: int) -> int:
        if value is None:
            return NULL[k]
        if isinstance(value, str):
            if names is None or value not in names:
                raise ValueError(f"unknown {('digit', 'colour', 'thickness')[k]} {value!r}; known: {names}")
            return names.index(value)
        if not 0 <= int(value) < NULL[k]:
            raise ValueError(f"{('digit', 'colour', 'thickness')[k]} id must be in [0, {NULL[k]}), got {value}")
        return int(value)

    return [slot(digit, None, 0), slot(colour, COLOURS, 1), slot(thickness, THICKNESS, 2)]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] → [0, 1], clipped."""
    return ((images + 1) / 2).clamp(0, 1)
