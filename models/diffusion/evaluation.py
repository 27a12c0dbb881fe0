"""The family's evaluation kit: a digit classifier (accuracy + 64-d features), Fréchet distance on
those features (torchmetrics' `FrechetInceptionDistance` with our network as its `feature`
extractor; "FD" in the records), k-NN precision/recall (Kynkäänniemi et al. 2019, k = 3),
HSV saturation of the foreground, the clipped-pixel fraction and PSNR.

The classifier is trained once per configuration and cached in the same cache folder as the base
model (keyed by a hash of its settings), so every reproduction scores with the same network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance

from models.checkpoint import trained_once
from models.context import RunContext, stop_if_cancelled
from models.diffusion.data import coloured_digits, to_unit
from models.diffusion.training import cache_root
from models.provenance import trained_key


class DigitClassifier(nn.Module):
    """Conv net on [0, 1] RGB 16×16 images; `forward` gives 64-d features (what FID needs),
    `logits` the 10 digit scores. `num_features` tells torchmetrics the feature size."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    variants: int = 4
    seed: int = 0

    def key(self) -> str:
        return trained_key(asdict(self), "models.diffusion.evaluation")  # the recipe, the training code, the libraries


def train_classifier(config: ClassifierConfig, ctx: RunContext | None = None) -> DigitClassifier:
    """Adam on cross-entropy; with a run context, raises `Cancelled` between epochs once it is cancelled."""
    data = coloured_digits("train", config.variants, seed=config.seed + 1)
    x, y = to_unit(data.images), data.labels
    torch.manual_seed(config.seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        if ctx is not None:
            stop_if_cancelled(ctx)
        for idx in torch.randperm(len(x), generator=g).split(config.batch_size):
            loss = F.cross_entropy(net.logits(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def digit_classifier(ctx: RunContext, smoke: bool = False) -> DigitClassifier:
    """The cached evaluation classifier (smoke: one epoch)."""
    config = ClassifierConfig(epochs=1, variants=1) if smoke else ClassifierConfig()
    path = cache_root(ctx) / "diffusion" / f"digit-classifier-{config.key()}.safetensors"
    return trained_once(path, DigitClassifier(), lambda: train_classifier(config, ctx))


@torch.no_grad()
def features(net: DigitClassifier, images01: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([net(images01[i : i + batch]) for i in range(0, len(images01), batch)])


@torch.no_grad()
def accuracy(net: DigitClassifier, images01: torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.cat([net.logits(images01[i : i + 512]) for i in range(0, len(images01), 512)])
    return (logits.argmax(1) == labels).float().mean().item()


def frechet_distance(net: DigitClassifier, real01: torch.Tensor, fake01: torch.Tensor) -> float:
    """FD between classifier-feature Gaussians (torchmetrics FID with our network as extractor)."""
    fid = FrechetInceptionDistance(feature=net, normalize=True, reset_real_features=False)
    with torch.no_grad():
        fid.update(real01, real=True)
        fid.update(fake01, real=False)
    return float(fid.compute())


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall: a fake is 'precise' if it lies inside some real sample's k-NN ball;
    a real is 'recalled' if it lies inside some fake sample's k-NN ball."""

    def radii(f: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(f, f)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return (torch.cdist(points, centres) <= r[None]).any(dim=1).float().mean().item()

    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    return covered(fake_feats, real_feats, radii(real_feats)), covered(real_feats, fake_feats, radii(fake_feats))


def saturation(images01: torch.Tensor, ink_threshold: float = 0.25) -> float:
    """Mean HSV saturation S = (max − min)/max over foreground pixels (value V = max > threshold)."""
    v = images01.max(dim=1).values
    s = (v - images01.min(dim=1).values) / v.clamp_min(1e-6)
    mask = v > ink_threshold
    return (s[mask].mean() if mask.any() else torch.tensor(0.0)).item()


def clipped_fraction(raw: torch.Tensor) -> float:
    """Fraction of model-space values outside [−1, 1] before clipping."""
    return (raw.abs() > 1).float().mean().item()


def psnr(images01: torch.Tensor, reference01: torch.Tensor) -> float:
    return float(peak_signal_noise_ratio(images01, reference01, data_range=1.0))


@dataclass
class EvaluationKit:
    """The classifier plus the real reference set (held-out coloured digits) and its statistics."""

    net: DigitClassifier
    real01: torch.Tensor
    real_feats: torch.Tensor
    real_saturation: float

    @classmethod
    def build(cls, ctx: RunContext, smoke: bool = False) -> EvaluationKit:
        net = digit_classifier(ctx, smoke)
        real = to_unit(coloured_digits("heldout", variants=1 if smoke else 2, seed=7).images)
        return cls(net, real, features(net, real), saturation(real))

    def score(self, images01: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        fake_feats = features(self.net, images01)
        precision, recall = precision_recall(self.real_feats, fake_feats)
        sat = saturation(images01)
        return {
            "fd": frechet_distance(self.net, self.real01, images01),
            "precision": precision,
            "recall": recall,
            "accuracy": accuracy(self.net, images01, labels),
            "saturation": sat,
            "saturation_gap": abs(sat - self.real_saturation),
            "clipped": clipped_fraction(raw),
        }
