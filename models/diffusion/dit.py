"""A mini-DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023: patchify, fixed 2-D
sin-cos positions, adaLN-Zero blocks) on coloured 16×16 digits, class-conditioned — the model PCPP
splits into patches. A U-Net's 3×3 convs and GroupNorm would need halo and statistics exchange; in a
DiT every layer but self-attention is per token, so K and V are the only thing patches exchange.

Each block takes an `attend(q, k, v, layer)` callback for its self-attention, so the same weights run
whole (full attention) or as one strip of rows whose keys and values partly come from other
processes (`models.diffusion.patch_parallel`). Token positions are global: a strip embeds its own
rows with their positions in the full image.

Trained once per configuration (ε-prediction, the base model's cosine DDPM schedule) and cached in
the shared cache folder under the config's hash.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import trained_once
from models.context import RunContext, shared_cache_dir, stop_if_cancelled
from models.diffusion.data import IMAGE_SIZE, coloured_digits
from models.diffusion.model import training_scheduler
from models.provenance import trained_key

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows·cols, dim] fixed 2-D sin-cos position embedding (DiT/MAE)."""

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([one_d(dim // 2, yy.flatten()), one_d(dim // 2, xx.flatten())], 1).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], 1)


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, attend: Attend, layer: int) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, w = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, layer).transpose(1, 2).reshape(b, n, w)
        x = x + gate1 * self.proj(a)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


@dataclass(frozen=True)
class DiTConfig:
    patch: int = 2
    width: int = 64
    depth: int = 4
    heads: int = 4
    classes: int = 10
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def key(self) -> str:
        return trained_key(asdict(self), "models.diffusion.dit")  # the recipe, the training code, the libraries

    @property
    def grid(self) -> int:
        return IMAGE_SIZE // self.patch


class MiniDiT(nn.Module):
    """ε-prediction DiT; `forward_rows` runs the patch rows [row0, row0 + rows) of an image strip."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        w, p = config.width, config.patch
        self.embed = nn.Linear(3 * p * p, w)
        self.register_buffer("pos", sincos_2d(w, config.grid, config.grid), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.y_embed = nn.Embedding(config.classes + 1, w)  # the last id is the null class
        self.blocks = nn.ModuleList(DiTBlock(w, config.heads) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, 3 * p * p)
        for layer in (self.ada_out[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config.patch
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        b, p, g = tokens.shape[0], self.config.patch, self.config.grid
        return tokens.view(b, rows, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, rows * p, g * p)

    def forward_rows(
        self, strip: torch.Tensor, t: torch.Tensor, y: torch.Tensor, row0: int, attend: Attend = full_attention
    ) -> torch.Tensor:
        """ε for an image strip [B, 3, rows·patch, 16] whose first patch row is `row0` of the full grid."""
        rows = strip.shape[2] // self.config.patch
        g = self.config.grid
        x = self.embed(self.patchify(strip)) + self.pos[row0 * g : (row0 + rows) * g]
        c = self.t_mlp(timestep_embedding(t.expand(len(strip)), self.config.width)) + self.y_embed(y)
        for i, block in enumerate(self.blocks):
            x = block(x, c, attend, i)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.out(self.norm_out(x) * (1 + scale) + shift), rows)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x, t, y, 0)


def train_dit(config: DiTConfig, ctx: RunContext | None = None) -> MiniDiT:
    """DDPM ε-prediction (Ho et al. 2020, Eq. 14) with 10% null labels; AdamW, cosine decay. With a run
    context, reports progress every step and raises `Cancelled` when the run is cancelled."""
    data = coloured_digits("train", 2, seed=config.seed)
    torch.manual_seed(config.seed)
    model = MiniDiT(config)
    alphas = training_scheduler().alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    for step in range(config.steps):
        if ctx is not None:
            stop_if_cancelled(ctx)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        x0, y = data.images[idx], data.labels[idx].clone()
        y[torch.rand(len(y), generator=g) < 0.1] = config.classes
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (len(x0),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ctx is not None:
            ctx.progress(step + 1, config.steps, f"mini-DiT: loss {loss.item():.4f}")
    return model.eval()


SMOKE_DIT = DiTConfig(width=32, depth=2, heads=2, steps=2, batch_size=8)
FULL_DIT = DiTConfig()


def dit_model(ctx: RunContext, smoke: bool = False, config: DiTConfig | None = None) -> MiniDiT:
    """The cached trained mini-DiT for `config` (trained at most once per cache folder; a cancelled run stops
    the training and caches nothing)."""
    config = config or (SMOKE_DIT if smoke else FULL_DIT)
    path = shared_cache_dir(ctx) / "diffusion" / f"mini-dit-{config.key()}.safetensors"
    return trained_once(path, MiniDiT(config), lambda: train_dit(config, ctx))
