"""The zero-shot retrieval and clustering protocol of metric learning: seen classes train, unseen ones test.

`zero_shot_split` puts every image of classes 0..S−1 in training and every image of the others in
the test set (the CUB-200 / Cars-196 protocol, here on digits: 0–4 seen, 5–9 unseen); the unseen
classes are scored by `evaluation.zero_shot_metrics` (Recall@k, NMI, ARI, MAP@R).
`class_balanced_batch` draws the k classes × m images batches metric losses train on
(pytorch-metric-learning's `MPerClassSampler`, drawn from a seeded generator so a resumed run draws
the same batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.datasets import Dataset
from models.representation.augment import image_splits


@dataclass
class ZeroShotData:
    x_seen: torch.Tensor
    y_seen: torch.Tensor
    x_unseen: torch.Tensor
    y_unseen: torch.Tensor


def zero_shot_split(dataset: Dataset | None, seen_classes: int, image_size: int) -> ZeroShotData:
    """All images (every split) of classes < `seen_classes` train, all images of the others test."""
    if dataset is None:
        raise ValueError("the zero-shot protocol needs an 'image-class' dataset")
    splits = image_splits(dataset, image_size)
    x = torch.cat([splits[s][0] for s in ("train", "val", "test")])
    y = torch.cat([splits[s][1] for s in ("train", "val", "test")])
    seen = y < seen_classes
    if seen.all() or not seen.any():
        raise ValueError(f"seen_classes={seen_classes} leaves no seen or no unseen class")
    return ZeroShotData(x[seen], y[seen], x[~seen], y[~seen])


def class_balanced_batch(y: torch.Tensor, classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `classes` random classes × `per_class` random images each (with replacement if short)."""
    labels = torch.unique(y)
    picked = labels[torch.randperm(len(labels), generator=generator)[:classes]]
    rows = []
    for c in picked:
        members = torch.nonzero(y == c).squeeze(1)
        rows.append(members[torch.randint(len(members), (per_class,), generator=generator)])
    return torch.cat(rows)
