"""TinyCLIP's features and its zero-shot classifiers (Radford et al. 2021, §3.1.2).

A class is scored by s·cos(image feature, prompt feature) with the model's scale s. Three readings
of one-digit scenes, each split by whether the scene's (colour, digit) class was held out of
pretraining (`novel`) or not (`seen`):

- `class_acc`: the best of the 60 joint prompts ("a red 3") is the scene's class;
- `colour_acc`: the colour of highest marginal p(c) = Σ_d p(c, d) under the 60-way softmax;
- `digit_acc`: the best of the 10 digit prompts ("a 3").

On novel classes the joint prompt is a composition never seen in training, so `class_acc` there
measures compositional generalisation, while colour and digit read each attribute alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.diffusion.data import COLOURS
from models.vl.captions import class_prompt, digit_prompt
from models.vl.evaluation import zero_shot_accuracy
from models.vl.losses import scale
from models.vl.scenes import DIGITS, Classes, Scene, render, sample_scenes
from models.vl.tinyclip import TinyClip, pixel_values, tokenize
from models.vl.towers import encode_image, encode_text

CLASSES = tuple((c, d) for c in range(len(COLOURS)) for d in DIGITS)  # class id = colour · 10 + digit


@torch.no_grad()
def text_features(clip: TinyClip, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised text features [N, D]."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize(clip.tokenizer, texts[i : i + batch_size])
        out.append(encode_text(clip.model, ids, mask).features)
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def image_features(clip: TinyClip, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised image features [N, D] of scene images in [0, 1]."""
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat([encode_image(clip.model, pixel_values(c)).features for c in chunks]), dim=-1)


@torch.no_grad()
def prompt_logits(clip: TinyClip, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """[N, P] s · cos(image, prompt)."""
    return scale(clip.model.logit_scale) * image_features(clip, images) @ text_features(clip, prompts).T


def zero_shot_scores(clip: TinyClip, scenes: Sequence[Scene]) -> dict[str, float]:
    """Class, colour and digit accuracy of one-digit scenes."""
    images = render(scenes)
    colour = torch.tensor([s.objects[0].colour for s in scenes])
    digit = torch.tensor([s.objects[0].digit for s in scenes])
    joint = prompt_logits(clip, images, [class_prompt(c, d) for c, d in CLASSES])
    marginal = joint.log_softmax(dim=1).view(len(scenes), len(COLOURS), len(DIGITS)).logsumexp(dim=2)
    return {
        "class_acc": zero_shot_accuracy(joint, colour * len(DIGITS) + digit),
        "colour_acc": zero_shot_accuracy(marginal, colour),
        "digit_acc": zero_shot_accuracy(prompt_logits(clip, images, [digit_prompt(d) for d in DIGITS]), digit),
    }


def zero_shot_report(clip: TinyClip, n: int = 600, seed: int = 1) -> dict[str, float]:
    """Scores on one-digit test-hand scenes of seen and of novel classes: `seen_colour_acc`, `novel_digit_acc`, …"""
    report = {}
    for classes in ("seen", "novel"):
        which: Classes = classes
        scenes = sample_scenes(n, seed, classes=which, split="test", counts=(1.0,))
        report |= {f"{classes}_{k}": v for k, v in zero_shot_scores(clip, scenes).items()}
    return report
