"""Encoders for the representation family: a small CNN body and projection heads, saved as a model.

The body is the classification kit's Conv-4 (`small_cnn`) without its classifier head; evaluation
uses the body's features (SimCLR's protocol: the projection head is discarded). An encoder is
stored as a folder — `encoder.safetensors` (body weights) and `encoder.json` (how to rebuild it) —
which `ctx.register_model` publishes and any `evaluate` job (e.g. `rankme`) loads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.nn.backbones import small_cnn

WEIGHTS, CONFIG = "encoder.safetensors", "encoder.json"


def cnn_body(in_channels: int, width: int, image_size: int) -> nn.Module:
    """Conv-4 feature extractor with a `feature_dim` attribute (= width)."""
    body = small_cnn(in_channels, 1, width=width, image_size=image_size).body
    body.feature_dim = width
    return body


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SimCLR's 2-layer MLP head g(h) = W₂ ReLU(BN(W₁ h))."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class ContrastiveEncoder(nn.Module):
    """Body f and one or more projection heads g_h; `forward` returns one projection per head."""

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        image_size: int = 16,
        proj_hidden: int = 128,
        proj_dim: int = 64,
        heads: int = 1,
    ):
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width, "image_size": image_size}
        self.body = cnn_body(in_channels, width, image_size)
        self.heads = nn.ModuleList(projection_head(width, proj_hidden, proj_dim) for _ in range(heads))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(x)
        return [head(h) for head in self.heads]


@torch.no_grad()
def embed(body: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Features of `x` in eval mode, batch by batch."""
    was_training = body.training
    body.eval()
    out = torch.cat([body(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    body.train(was_training)
    return out


def save_encoder(folder: Path, encoder: ContrastiveEncoder, extra: dict | None = None) -> Path:
    """Write the body's weights and config; `extra` (a job's params, say) is kept in the config too, but
    never overrides how the body was built (a params `width` or `image_size` that disagrees with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.body.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({**(extra or {}), "kind": "cnn", **encoder.config}, default=str))
    return folder


def load_encoder(folder: Path) -> tuple[nn.Module, dict]:
    """The body saved by `save_encoder`, in eval mode, and its config."""
    folder = Path(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS}; register an encoder saved with save_encoder")
    config = json.loads((folder / CONFIG).read_text())
    body = cnn_body(config["in_channels"], config["width"], config["image_size"])
    body.load_state_dict(load_file(str(folder / WEIGHTS)))
    return body.eval(), config
