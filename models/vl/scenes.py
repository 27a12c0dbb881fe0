"""`digit-scenes`: 32×32 RGB scenes of 1–3 coloured handwritten digits with exact attributes.

Each object is one of scikit-learn's 8×8 digits painted as the diffusion family's coloured digits
are (`models.diffusion.data`: upsampled to 16×16, thinned or thickened, one of six hues jittered
±10° at HSV saturation U(0.4, 0.7)), then placed at one of the 3×3 grid cells, large (16 px) or small
(10 px). The background is the *domain*: plain black, grey noise, stripes or a checkerboard, all
grey so that they never change an object's colour. Objects of one scene carry distinct digits (so
"the 3" names one object) and sit in cells at Chebyshev distance ≥ 2 (so a large digit never
overlaps another).

Attributes (what captions, questions and edits speak of): digit, colour, size, thickness,
position per object, and the background. Nuisances (what near-duplicates vary): the handwriting
(`source`, an index into scikit-learn's digits), the hue jitter, the saturation and the
background's pattern seed.

Of the 60 (colour, digit) classes, half never appear in pretraining (`novel_classes`): colour c is
seen with five consecutive digits (mod 10) from its own start, so each colour misses five digits
and each digit three colours (a balanced, cyclic Latin-square design), and no two colour groups
split the digits in two (a parity split, say, would let a colour predict the digit's parity, a
shortcut the towers learn). Compositional zero-shot claims are about unseen pairs of seen words.
Handwriting is split 60/20/20 by digit (`models.datasets.base.stratified_split`), so test scenes
also show unseen hands. Everything is a pure function of a seed.
"""

from __future__ import annotations

import colorsys
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets.base import stratified_split
from models.diffusion.data import (
    COLOURS,
    HUES,
    SATURATION_RANGE,
    THICKNESS,
    _ink,  # the shared digit painter (upsample, thin/thicken)
)

IMAGE_SIZE = 32
GRID = 3
DIGITS = tuple(range(10))
SIZES = ("small", "large")
SIZE_PIXELS = (10, 16)
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
ATTRIBUTES = ("digit", "colour", "size", "thickness", "position")
Classes = Literal["seen", "novel", "all"]
Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DigitObject:
    digit: int
    colour: int
    size: int  # index into SIZES
    thickness: int  # index into THICKNESS
    position: int  # row-major cell of the 3×3 grid
    source: int  # handwriting: the index of the scikit-learn digit painted
    hue_jitter: float = 0.0  # degrees
    saturation: float = 0.55

    def attributes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class Scene:
    objects: tuple[DigitObject, ...]
    background: int  # the domain, an index into BACKGROUNDS
    pattern_seed: int = 0  # draws the background's noise, stripe orientation and phase

    def attributes(self) -> tuple[tuple[dict[str, int], ...], int]:
        """What the scene shows, without its nuisances: (per-object attributes, background)."""
        return tuple(o.attributes() for o in self.objects), self.background

    def find(self, digit: int) -> DigitObject | None:
        return next((o for o in self.objects if o.digit == digit), None)


# -- classes and handwriting ---------------------------------------------------------------------


# colour c is seen with the five digits d ≡ s_c … s_c + 4 (mod 10); colours 2k and 2k + 1 are complementary
SEEN_DIGITS_FROM = (0, 5, 2, 7, 4, 9)


def novel_classes() -> frozenset[tuple[int, int]]:
    """The 30 (colour, digit) classes held out of pretraining: (d − s_c) mod 10 ≥ 5."""
    return frozenset((c, d) for c in range(len(COLOURS)) for d in DIGITS if (d - SEEN_DIGITS_FROM[c]) % 10 >= 5)


def allowed_classes(classes: Classes) -> list[tuple[int, int]]:
    novel = novel_classes()
    every = [(c, d) for c in range(len(COLOURS)) for d in DIGITS]
    if classes == "all":
        return every
    return [cd for cd in every if (cd in novel) == (classes == "novel")]


@lru_cache(maxsize=3)
def _class_pool(classes: Classes) -> tuple[tuple[int, int], ...]:
    return tuple(allowed_classes(classes))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    raw = load_digits()
    target = raw.target.astype(np.int64)
    return raw.images, target, stratified_split(target, seed=0)


@lru_cache(maxsize=3)
def handwriting(split: Split) -> dict[int, np.ndarray]:
    """For each digit, the scikit-learn indices of the hands a split draws from."""
    _, target, idx = _digits()
    which = idx[split]
    return {d: which[target[which] == d] for d in DIGITS}


# -- sampling -------------------------------------------------------------------------------------


def cell(position: int) -> tuple[int, int]:
    return divmod(position, GRID)


def apart(a: int, b: int) -> bool:
    """Cells at Chebyshev distance ≥ 2 (no two digits touch, even large ones)."""
    (ra, ca), (rb, cb) = cell(a), cell(b)
    return max(abs(ra - rb), abs(ca - cb)) >= 2


@lru_cache(maxsize=4)
def layouts(count: int) -> tuple[tuple[int, ...], ...]:
    """Every set of `count` cells pairwise apart."""
    cells = itertools.combinations(range(GRID * GRID), count)
    return tuple(s for s in cells if all(apart(a, b) for a, b in itertools.combinations(s, 2)))


def sample_object(
    rng: np.random.Generator, digit: int, colour: int, position: int, hands: dict[int, np.ndarray]
) -> DigitObject:
    return DigitObject(
        digit=digit,
        colour=colour,
        size=int(rng.integers(len(SIZES))),
        thickness=int(rng.integers(len(THICKNESS))),
        position=position,
        source=int(rng.choice(hands[digit])),
        hue_jitter=float(rng.uniform(-10, 10)),
        saturation=float(rng.uniform(*SATURATION_RANGE)),
    )


def sample_scene(
    rng: np.random.Generator,
    classes: Classes = "seen",
    split: Split = "train",
    counts: Sequence[float] = (0.5, 0.3, 0.2),
) -> Scene:
    """One scene: 1–3 objects (probabilities `counts`) of distinct digits from `classes`, cells apart."""
    count = int(rng.choice(len(counts), p=np.asarray(counts) / np.sum(counts))) + 1
    pool = _class_pool(classes)
    chosen: list[tuple[int, int]] = []
    for i in rng.permutation(len(pool)):
        if all(pool[i][1] != d for _, d in chosen):
            chosen.append(pool[i])
        if len(chosen) == count:
            break
    options = layouts(count)
    cells = options[int(rng.integers(len(options)))]
    hands = handwriting(split)
    objects = tuple(sample_object(rng, d, c, p, hands) for (c, d), p in zip(chosen, cells))
    return Scene(objects, background=int(rng.integers(len(BACKGROUNDS))), pattern_seed=int(rng.integers(2**31)))


def sample_scenes(
    n: int, seed: int, classes: Classes = "seen", split: Split = "train", counts: Sequence[float] = (0.5, 0.3, 0.2)
) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, classes, split, counts) for _ in range(n)]


def with_hand(obj: DigitObject, hands: dict[int, np.ndarray], rng: np.random.Generator) -> DigitObject:
    """The same object in another hand of its digit (a near-duplicate)."""
    others = hands[obj.digit][hands[obj.digit] != obj.source]
    return replace(obj, source=int(rng.choice(others)))


# -- rendering ------------------------------------------------------------------------------------


def _background(scene: Scene) -> torch.Tensor:
    """[3, 32, 32] grey pattern of the scene's domain, drawn from its pattern seed."""
    rng = np.random.default_rng(scene.pattern_seed)
    n = IMAGE_SIZE
    grid = np.add.outer(np.arange(n), np.zeros(n))
    kind = BACKGROUNDS[scene.background]
    if kind == "plain":
        grey = np.zeros((n, n))
    elif kind == "noise":
        grey = rng.uniform(0.0, 0.35, (n, n))
    elif kind == "stripes":
        phase, period = int(rng.integers(4)), 4
        lines = grid if rng.random() < 0.5 else grid.T
        grey = 0.3 * (((lines + phase) // (period // 2)) % 2)
    else:
        dy, dx = rng.integers(8, size=2)
        grey = 0.25 * ((((grid + dy) // 4) + ((grid.T + dx) // 4)) % 2)
    return torch.from_numpy(grey.astype(np.float32)).expand(3, n, n)


def _top_left(position: int, size_px: int) -> tuple[int, int]:
    def axis(i: int) -> int:
        centre = (2 * i + 1) * IMAGE_SIZE / (2 * GRID)
        return int(min(max(round(centre - size_px / 2), 0), IMAGE_SIZE - size_px))

    row, col = cell(position)
    return axis(row), axis(col)


def object_colour(obj: DigitObject) -> torch.Tensor:
    hue = (HUES[obj.colour] + obj.hue_jitter) % 360
    return torch.tensor(colorsys.hsv_to_rgb(hue / 360, obj.saturation, 1.0), dtype=torch.float32)


def render(scenes: Sequence[Scene]) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1]: each object's ink (the diffusion painter) over the background."""
    images, _, _ = _digits()
    objects = [o for s in scenes for o in s.objects]
    ink = _ink(
        images[[o.source for o in objects]],
        np.asarray([o.thickness for o in objects], dtype=np.int64),
        np.zeros((len(objects), 2), dtype=np.int64),
    )
    small = F.interpolate(ink, size=(SIZE_PIXELS[0],) * 2, mode="bilinear", antialias=True, align_corners=False)
    out = torch.empty(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE)
    k = 0
    for i, scene in enumerate(scenes):
        canvas = _background(scene).clone()
        for obj in scene.objects:
            mask = (small if obj.size == 0 else ink)[k]
            y, x = _top_left(obj.position, mask.shape[-1])
            window = canvas[:, y : y + mask.shape[-1], x : x + mask.shape[-1]]
            window.mul_(1 - mask).add_(mask * object_colour(obj)[:, None, None])
            k += 1
        out[i] = canvas
    return out.clamp_(0, 1)
