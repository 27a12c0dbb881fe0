"""Contrastive pretraining of TinyCLIP on digit-scenes of the seen (colour, digit) classes.

Images of `train_scenes` scenes (seen classes, training hands) are rendered once; each step takes
a random batch of them with a freshly drawn caption each (new synonyms, attribute subsets and
prefixes every time, a cheap text augmentation) and minimises the CLIP loss
L = ½[CE(s·I Tᵀ) + CE(s·T Iᵀ)] (`models.vl.losses`) with AdamW (β = 0.9/0.98, ε = 1e-6, weight decay
on matrices only, as CLIP), linear warm-up and cosine decay to a tenth of the peak rate. The
temperature t (s = exp t, clipped at 100) is learned.

A digit curriculum (ours, not CLIP's): with full captions the towers first learn what is cheap
to see (colour, size, cell, background) and the digit's shape stays at chance for hundreds of
steps, since captions that differ only in their digit word start out almost identical. The first
`digit_steps` steps therefore use one-digit scenes captioned by their digit alone ("a 3"), which
leaves shape as the only signal; afterwards `digit_only` of the captions still omit colours. A
colour-free pair may show its image in grey (`grey`): the caption stays true, and digit detectors
that read shape rather than one colour's channels carry over to colours a digit was never seen in
(the held-out classes stay unseen: a grey digit has no colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.context import RunContext, stop_if_cancelled
from models.llm.pretraining import lr_at
from models.vl.captions import caption, class_prompt
from models.vl.losses import clip_loss, scale
from models.vl.scenes import render, sample_scenes
from models.vl.tinyclip import SizeName, TinyClip, build_tinyclip, caption_tokenizer, pixel_values, tokenize
from models.vl.towers import encode_image, encode_text
from models.vl.zero_shot import CLASSES


@dataclass(frozen=True)
class TinyClipRecipe:
    """Everything that decides the weights; hashed into the cached model's key (`models.vl.base`)."""

    size: SizeName = "tiny"
    steps: int = 1700
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    train_scenes: int = 20_000
    digit_steps: int = 600  # the curriculum: one-digit scenes, digit-only captions
    digit_only: float = 0.5  # afterwards, the fraction of captions without colours
    grey: float = 0.5  # the fraction of colour-free pairs whose image is turned grey
    vocab_size: int = 512
    seed: int = 0
    log_every: int = 25


def optimizer(model: torch.nn.Module, recipe: TinyClipRecipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def greyed(images: torch.Tensor, which: np.ndarray) -> torch.Tensor:
    """The images with rows `which` turned grey (channel mean): shape without colour."""
    out = images.clone()
    out[which] = images[which].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return out


def batch_loss(clip: TinyClip, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    ids, mask = tokenize(clip.tokenizer, captions)
    image = F.normalize(encode_image(clip.model, pixel_values(images)).features, dim=-1)
    text = F.normalize(encode_text(clip.model, ids, mask).features, dim=-1)
    return clip_loss(image, text, scale(clip.model.logit_scale))


def pretrain_tinyclip(ctx: RunContext, recipe: TinyClipRecipe) -> TinyClip:
    """Train TinyCLIP from scratch; logs `loss` and `logit_scale`, reports progress, stops when cancelled."""
    rng = np.random.default_rng(recipe.seed)
    scenes = sample_scenes(recipe.train_scenes, recipe.seed, classes="seen", split="train")
    single = np.flatnonzero([len(s.objects) == 1 for s in scenes])
    corpus = [caption(s, rng) for s in scenes] + [class_prompt(c, d) for c, d in CLASSES]
    clip = build_tinyclip(recipe.size, caption_tokenizer(corpus, recipe.vocab_size), recipe.seed)
    images = render(scenes)
    opt = optimizer(clip.model, recipe)
    clip.model.train()
    for step in range(recipe.steps):
        stop_if_cancelled(ctx)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)  # type: ignore[arg-type]  # reads lr, warmup_steps, steps
        curriculum = step < recipe.digit_steps
        batch = rng.choice(single if curriculum else len(scenes), recipe.batch_size, replace=False)
        colours = (rng.random(len(batch)) >= recipe.digit_only) & (not curriculum)
        captions = [
            caption(scenes[i], rng, detail=0.0 if curriculum else 0.6, colour=c) for i, c in zip(batch, colours)
        ]
        loss = batch_loss(clip, greyed(images[batch], ~colours & (rng.random(len(batch)) < recipe.grey)), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            ctx.log(step, loss=loss.item(), logit_scale=float(scale(clip.model.logit_scale.detach())))
            ctx.progress(step + 1, recipe.steps, f"TinyCLIP step {step + 1}/{recipe.steps}")
    clip.model.eval()
    return clip
