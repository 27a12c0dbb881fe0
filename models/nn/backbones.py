"""Small backbones shared by the classification family: an MLP and a four-block CNN.

Both are a `Classifier` — a body and a linear head — with `features(x)` (the penultimate
representation, for linear probes and distillation) and `forward(x)` (logits). They are sized for
the built-in datasets (8×8 digits, 20-feature tables): a full training run takes seconds on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class Classifier(nn.Module):
    """A feature extractor `body` and a linear `head` over its `feature_dim` outputs."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(
    in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), activation: Literal["relu", "tanh"] = "relu"
) -> Classifier:
    """Fully connected network on flattened inputs: (Linear → activation) per hidden width → Linear."""
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)


def small_cnn(
    in_channels: int, num_classes: int, width: int = 32, blocks: int = 4, image_size: int = 8, global_pool: bool = True
) -> Classifier:
    """Conv-4 style network (Vinyals et al. 2016): conv-BN-ReLU blocks, pooling while the map allows.

    On 8×8 digits two of the four blocks pool (8 → 4 → 2); a global average pool then gives a
    `width`-dimensional feature whatever the input size. `global_pool=False` flattens the last map
    instead (width·2·2 features on digits), as Prototypical Networks' Conv-4 embedding does (1600-d on
    84×84 images): the spatial layout is what lets an embedding trained on some classes tell unseen ones apart.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    if global_pool:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return Classifier(nn.Sequential(*layers), width, num_classes)
    return Classifier(nn.Sequential(*layers, nn.Flatten()), width * size * size, num_classes)


def build_backbone(
    kind: Literal["mlp", "cnn"], input_shape: Sequence[int], num_classes: int, hidden: int = 256, depth: int = 2
) -> Classifier:
    """The backbone a classification method asks for, sized to one example's shape.

    `input_shape` is `[C, H, W]` for image datasets and `[D]` for tables; a CNN needs images.
    """
    if kind == "mlp":
        return mlp(math.prod(input_shape), num_classes, hidden=[hidden] * depth)
    if len(input_shape) != 3:
        raise ValueError(f"a CNN backbone needs image inputs [C, H, W], got shape {list(input_shape)}; use 'mlp'")
    return small_cnn(input_shape[0], num_classes, width=hidden, image_size=min(input_shape[1:]))
