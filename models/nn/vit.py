"""A tiny Vision Transformer (Dosovitskiy et al., ICLR 2021) for the built-in 8×8 images.

Patches of `patch`×`patch` pixels are linearly embedded, a learnable [CLS] token and learnable
position embeddings are added, and `depth` pre-norm encoder blocks (torch's `TransformerEncoderLayer`
with `norm_first=True`: x + MSA(LN x), then x + MLP(LN x), GELU) run over [CLS, patches]; a final
LayerNorm gives the tokens, and the classifier reads the [CLS] token. On digits with patch 2 there
are 16 patch tokens of width `dim`: with the defaults (64, depth 4, 4 heads) about 0.14M parameters,
trained in seconds on a CPU. `tokens(x)` exposes the final token states, which probing heads
(linear probing on [CLS], moment probing on all tokens) read from a frozen copy.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.num_patches = (image_size // patch) ** 2
        self.dim = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final token states [B, 1 + num_patches, dim]; index 0 is [CLS]."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls_token.expand(len(x), -1, -1), patches], dim=1) + self.pos_embed
        return self.norm(self.blocks(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x)[:, 0])
