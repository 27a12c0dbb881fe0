"""Synthetic "videos" for moment retrieval and highlight detection (the QVHighlights task, Lei et al. 2021).

A video is T ∈ [32, 75] frames (clips of `CLIP_SECONDS` each) of one static digit scene plus faint
per-frame pixel noise. In one span [start, end) an event happens: a new digit fades in, holds and
fades out at a free cell. Its opacity a_t is a trapezoid over the span (rising over the first
quarter, falling over the last, never below ¼ inside the span), the frame is the blend
(1 − a_t)·before + a_t·after, and the graded saliency is round(4·a_t) ∈ {1, …, 4} inside the span
and 0 outside. The query names the event ("a red 3 appears at the top left"); its relevant window
in seconds is [start, end)·CLIP_SECONDS, the format QVHighlights annotations use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from models.vl.captions import COLOUR_WORDS, DIGIT_WORDS, POSITION_WORDS, with_article
from models.vl.scenes import GRID, Classes, Scene, Split, apart, handwriting, render, sample_object, sample_scene

CLIP_SECONDS = 2.0
FRAMES = (32, 75)
FRAME_NOISE = 0.02


@dataclass(frozen=True)
class Video:
    frames: torch.Tensor  # [T, 3, 32, 32] in [0, 1]
    span: tuple[int, int]  # the event's frames [start, end)
    saliency: np.ndarray  # [T] graded 0 (outside the span) … 4
    query: str
    scene: Scene  # without the event object
    event: Scene  # with it, fully visible

    @property
    def window_seconds(self) -> tuple[float, float]:
        return self.span[0] * CLIP_SECONDS, self.span[1] * CLIP_SECONDS


def opacity(length: int) -> np.ndarray:
    """Trapezoid in [¼, 1] over a span of `length` frames: ramps over the first and last quarter."""
    t = (np.arange(length) + 0.5) / length
    ramp = np.minimum(np.minimum(t, 1 - t) / 0.25, 1.0)
    return 0.25 + 0.75 * ramp


def video(rng: np.random.Generator, classes: Classes = "all", split: Split = "train") -> Video:
    """One video: a 1–2 digit scene, an event digit fading in and out over a random span."""
    free: list[int] = []
    while not free:  # some two-digit layouts leave no cell apart from both
        scene = sample_scene(rng, classes, split, counts=(0.5, 0.5))
        free = [p for p in range(GRID * GRID) if all(apart(p, o.position) for o in scene.objects)]
    digits = [d for d in range(10) if scene.find(d) is None]
    digit, colour = int(rng.choice(digits)), int(rng.integers(len(COLOUR_WORDS)))
    newcomer = sample_object(rng, digit, colour, int(rng.choice(free)), handwriting(split))
    event = replace(scene, objects=(*scene.objects, newcomer))

    length = int(rng.integers(FRAMES[0], FRAMES[1] + 1))
    span_length = int(rng.integers(4, length // 3 + 1))
    start = int(rng.integers(0, length - span_length + 1))
    alpha = np.zeros(length, dtype=np.float32)
    alpha[start : start + span_length] = opacity(span_length)
    saliency = np.rint(4 * alpha).astype(np.int64)

    before, after = render([scene, event])
    a = torch.from_numpy(alpha)[:, None, None, None]
    noise = torch.from_numpy(rng.normal(0, FRAME_NOISE, (length, *before.shape)).astype(np.float32))
    frames = ((1 - a) * before + a * after + noise).clamp(0, 1)
    where = POSITION_WORDS[newcomer.position][0]
    query = f"{with_article([COLOUR_WORDS[colour][0], DIGIT_WORDS[digit][0]])} appears at the {where}"
    return Video(frames, (start, start + span_length), saliency, query, scene, event)


def videos(n: int, seed: int, classes: Classes = "all", split: Split = "train") -> list[Video]:
    rng = np.random.default_rng(seed)
    return [video(rng, classes, split) for _ in range(n)]
