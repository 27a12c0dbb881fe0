"""CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3), as open_clip's `ClipLoss` computes it.

With L2-normalised image features I and text features T of N matched pairs and scale s = exp(t):

    logits = s · I Tᵀ,   L = ½ [CE(logits, diag) + CE(logitsᵀ, diag)]

i.e. InfoNCE (van den Oord et al. 2018) from each image to the N texts and from each text to the N
images, with pair i's own caption as the positive. The tests check it against open_clip's
`ClipLoss` to 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(t) at 100 to keep training stable


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """s · I Tᵀ ([N_images, N_texts]) for normalised features and an already exponentiated scale s."""
    return logit_scale * image_features @ text_features.T


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    logits = clip_logits(image_features, text_features, logit_scale)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def scale(log_scale: torch.Tensor) -> torch.Tensor:
    """s = exp(t), clipped at 100."""
    return log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
