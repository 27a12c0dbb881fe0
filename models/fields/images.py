"""2-D signals: scikit-learn's bundled sample photographs (`china.jpg`, `flower.jpg`, 427×640) as fields over
[0, 1]², centre-cropped to a square and resized; pixel centres at ((j + ½)/W, (i + ½)/H) as the CAM reference's
`get_mgrid`. Fitting uses every second pixel in each direction and testing all pixels, so three quarters of the
test pixels are never seen (the held-out PSNR measures interpolation)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

SAMPLE_IMAGES = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class ImageField:
    """A photo as (coordinates, colours): all pixels for testing, the stride-2 subset for fitting."""

    name: str
    size: int
    coords: torch.Tensor  # [H·W, 2], (x, y) in [0, 1]
    colours: torch.Tensor  # [H·W, 3] in [0, 1]
    train_index: torch.Tensor

    @property
    def train_coords(self) -> torch.Tensor:
        return self.coords[self.train_index]

    @property
    def train_colours(self) -> torch.Tensor:
        return self.colours[self.train_index]

    def as_image(self, values: torch.Tensor) -> torch.Tensor:
        """[H·W, 3] → [3, H, W]."""
        return values.T.reshape(3, self.size, self.size)


def pixel_coords(size: int) -> torch.Tensor:
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


@lru_cache(maxsize=8)
def sample_image_field(name: str, size: int = 128) -> ImageField:
    from sklearn.datasets import load_sample_image

    photo = load_sample_image(name)
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    colours = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).reshape(-1, 3)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    train = ((rows % 2 == 0) & (cols % 2 == 0)).flatten().nonzero()[:, 0]
    return ImageField(name, size, pixel_coords(size), colours, train)
