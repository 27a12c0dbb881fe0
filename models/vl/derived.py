"""Sets derived from digit-scenes whose ground truth is exact by construction.

- Noisy pairs (noisy-correspondence learning, e.g. NCR, Huang et al. 2021; PC², 2024): a fraction
  of the captions is moved to other images by a derangement of the chosen indices, so the noise
  mask is known: `noisy[i]` ⇔ caption i was written for another scene.
- Composed image retrieval triplets (reference image, modification text, target image), as in
  FashionIQ/CIRR: the target is the reference with 1–2 attributes of one digit edited and nothing
  else changed (same hands, hues, background pattern). The gallery holds every target and, per
  target, near-duplicates that differ only in handwriting or only in background, so only a query
  that keeps the reference's nuisances retrieves the exact target.
- Text triplets (reference caption, modification text, target caption): the text-only training
  data of zero-shot CIR (RTD, Byun et al. 2024), written with the same caption draws for both scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from models.vl.captions import (
    COLOUR_WORDS,
    DIGIT_WORDS,
    POSITION_WORDS,
    SIZE_WORDS,
    THICKNESS_WORDS,
    caption,
    with_article,
)
from models.vl.scenes import ATTRIBUTES, BACKGROUNDS, DIGITS, GRID, Scene, Split, apart, handwriting, with_hand

# -- noisy pairs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisyPairs:
    scenes: list[Scene]
    captions: list[str]
    noisy: np.ndarray  # [N] bool: the caption belongs to another scene
    caption_of: np.ndarray  # [N] the scene each caption was written for


def noisy_pairs(scenes: Sequence[Scene], noise: float, seed: int) -> NoisyPairs:
    """Captions of round(noise·N) random pairs cyclically shifted among themselves (no caption stays home)."""
    rng = np.random.default_rng(seed)
    captions = [caption(s, rng) for s in scenes]
    n = len(scenes)
    chosen = rng.permutation(n)[: int(round(noise * n))]
    caption_of = np.arange(n)
    if len(chosen) >= 2:
        caption_of[chosen] = np.roll(chosen, 1)
    return NoisyPairs(list(scenes), [captions[j] for j in caption_of], caption_of != np.arange(n), caption_of)


# -- composed image retrieval ---------------------------------------------------------------------


@dataclass(frozen=True)
class CIRTriplet:
    reference: Scene
    text: str
    target: Scene
    digit: int  # the reference digit whose object is edited
    edits: dict[str, int]  # attribute → new value


def _edit_options(scene: Scene, digit: int, attribute: str) -> list[int]:
    obj = scene.find(digit)
    assert obj is not None
    if attribute == "digit":
        return [d for d in DIGITS if scene.find(d) is None]
    if attribute == "position":
        others = [o.position for o in scene.objects if o is not obj]
        return [p for p in range(GRID * GRID) if p != obj.position and all(apart(p, q) for q in others)]
    sizes = {"colour": len(COLOUR_WORDS), "size": len(SIZE_WORDS), "thickness": len(THICKNESS_WORDS)}
    return [v for v in range(sizes[attribute]) if v != getattr(obj, attribute)]


def apply_edits(scene: Scene, digit: int, edits: dict[str, int], split: Split, rng: np.random.Generator) -> Scene:
    """The scene with one object's attributes changed; a new digit gets a hand of its own, all else stays."""
    objects = []
    for obj in scene.objects:
        if obj.digit == digit:
            obj = replace(obj, **edits)
            if "digit" in edits:
                obj = replace(obj, source=int(rng.choice(handwriting(split)[obj.digit])))
        objects.append(obj)
    return replace(scene, objects=tuple(objects))


def _edit_phrase(attribute: str, value: int, subject: str, rng: np.random.Generator) -> str:
    def pick(words: Sequence[str]) -> str:
        return words[int(rng.integers(len(words)))]

    if attribute == "digit":
        return f"turn {subject} into {with_article([pick(DIGIT_WORDS[value])])}"
    if attribute == "position":
        return f"move {subject} to the {pick(POSITION_WORDS[value])}"
    table = {"colour": COLOUR_WORDS, "size": SIZE_WORDS, "thickness": THICKNESS_WORDS}[attribute]
    return f"make {subject} {pick(table[value])}"


def modification_text(digit: int, edits: dict[str, int], rng: np.random.Generator) -> str:
    """ "make the 3 blue and move it to the top left": the first edit names the digit, later ones say "it"."""
    phrases = [
        _edit_phrase(a, v, f"the {DIGIT_WORDS[digit][int(rng.integers(2))]}" if i == 0 else "it", rng)
        for i, (a, v) in enumerate(edits.items())
    ]
    return " and ".join(phrases)


def cir_triplet(scene: Scene, rng: np.random.Generator, split: Split = "train", max_edits: int = 2) -> CIRTriplet:
    """Edit 1–`max_edits` distinct attributes of one random object of `scene`."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    feasible = [a for a in ATTRIBUTES if _edit_options(scene, obj.digit, a)]
    count = min(int(rng.integers(1, max_edits + 1)), len(feasible))
    attributes = [feasible[i] for i in sorted(rng.choice(len(feasible), count, replace=False))]
    edits = {}
    for a in attributes:
        options = _edit_options(scene, obj.digit, a)
        edits[a] = int(options[int(rng.integers(len(options)))])
    target = apply_edits(scene, obj.digit, edits, split, rng)
    return CIRTriplet(scene, modification_text(obj.digit, edits, rng), target, obj.digit, edits)


def near_duplicates(scene: Scene, split: Split, rng: np.random.Generator) -> list[Scene]:
    """Two look-alikes of `scene`: every digit in another hand; the same digits on another background."""
    hands = handwriting(split)
    other_hand = replace(scene, objects=tuple(with_hand(o, hands, rng) for o in scene.objects))
    backgrounds = [b for b in range(len(BACKGROUNDS)) if b != scene.background]
    other_background = replace(scene, background=int(rng.choice(backgrounds)), pattern_seed=int(rng.integers(2**31)))
    return [other_hand, other_background]


@dataclass(frozen=True)
class CIRSet:
    triplets: list[CIRTriplet]
    gallery: list[Scene]  # targets first (gallery[i] is triplets[i].target), then their near-duplicates
    duplicate_of: np.ndarray  # [len(gallery)] the triplet whose target each gallery scene copies


def cir_set(scenes: Sequence[Scene], seed: int, split: Split = "train", max_edits: int = 2) -> CIRSet:
    rng = np.random.default_rng(seed)
    triplets = [cir_triplet(s, rng, split, max_edits) for s in scenes]
    duplicates = [(i, d) for i, t in enumerate(triplets) for d in near_duplicates(t.target, split, rng)]
    gallery = [t.target for t in triplets] + [d for _, d in duplicates]
    owner = np.concatenate([np.arange(len(triplets)), np.asarray([i for i, _ in duplicates], dtype=np.int64)])
    return CIRSet(triplets, gallery, owner)


@dataclass(frozen=True)
class TextTriplet:
    reference_caption: str
    text: str
    target_caption: str


def text_triplets(triplets: Sequence[CIRTriplet], seed: int) -> list[TextTriplet]:
    """Captions of reference and target from the same random draws, so they differ where the edits are."""
    rng = np.random.default_rng(seed)
    out = []
    for t in triplets:
        draw = int(rng.integers(2**31))
        ref = caption(t.reference, np.random.default_rng(draw), detail=1.0)
        tgt = caption(t.target, np.random.default_rng(draw), detail=1.0)
        out.append(TextTriplet(ref, t.text, tgt))
    return out
