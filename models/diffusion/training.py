"""Denoising training of the base model (DDPM ε-prediction, Ho et al. 2020, Eq. 14) and its cache.

`train_denoiser` is the one loop: AdamW, linear warm-up then cosine decay, an EMA of the weights
(the EMA is what gets saved and sampled), null-prompt and attribute dropout from `data.drop_tokens`.
It reports progress every step, checkpoints through the run context and resumes from the last
checkpoint, so a re-queued job continues where it stopped; a cancelled run raises
`models.context.Cancelled` at the next step. Batches are drawn from a generator seeded by (seed, step), so a
resumed run sees the same batches an uninterrupted one would.

`base_model(ctx, smoke)` gives every diffusion method the same trained model without retraining:
a model registered under the config's hash (`diffusion-base-<hash>`) when the context has one,
else a local cache folder keyed by the same hash, else it trains once and fills both (a cancelled
caller stops that training, and nothing is cached).
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.context import RunContext, shared_cache_dir, stop_if_cancelled
from models.diffusion.data import ColouredDigits, coloured_digits, drop_tokens
from models.diffusion.model import DiffusionParts, load_parts, new_parts, save_parts, training_scheduler
from models.provenance import trained_key


@dataclass(frozen=True)
class PretrainConfig:
    widths: tuple[int, ...] = (16, 32, 64)
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    null_prob: float = 0.1
    attr_drop_prob: float = 0.3
    variants: int = 4
    seed: int = 0
    checkpoint_every: int = 200

    def key(self) -> str:
        """Hash of everything that changes the weights (not the checkpoint cadence), the code included."""
        body = {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}
        return trained_key(body, "models.diffusion.training")  # and the training code and libraries


SMOKE_CONFIG = PretrainConfig(widths=(8, 16), steps=4, batch_size=16, warmup=1, variants=1, checkpoint_every=2)
FULL_CONFIG = PretrainConfig()


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _params(parts: DiffusionParts) -> list[torch.nn.Parameter]:
    return list(parts.unet.parameters()) + list(parts.prompt_encoder.parameters())


def train_denoiser(
    ctx: RunContext,
    config: PretrainConfig,
    data: ColouredDigits | None = None,
    on_step: Callable[[int, DiffusionParts], None] | None = None,
) -> DiffusionParts:
    """Train a fresh model under `config` on `ctx.device` and return its EMA weights (eval mode).
    Batches, noise and timesteps are drawn on CPU generators and moved, so a seed trains the same
    data order on any device."""
    data = data if data is not None else coloured_digits("train", config.variants, seed=config.seed)
    device = getattr(ctx, "device", "cpu")
    torch.manual_seed(config.seed)
    parts = new_parts(config.widths, config.null_prob, config.attr_drop_prob).to(device)
    ema = copy.deepcopy(parts)
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(_params(parts), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None and ckpt.state.get("config_key") == config.key():
        parts.unet.load_state_dict(ckpt.state["unet"])
        parts.prompt_encoder.load_state_dict(ckpt.state["encoder"])
        ema.unet.load_state_dict(ckpt.state["ema_unet"])
        ema.prompt_encoder.load_state_dict(ckpt.state["ema_encoder"])
        opt.load_state_dict(ckpt.state["optimizer"])
        start = ckpt.step
    parts.unet.train()
    ema_params = _params(ema)
    for step in range(start, config.steps):
        stop_if_cancelled(ctx)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        x0, tokens = data.images[idx], drop_tokens(data.tokens[idx], config.null_prob, config.attr_drop_prob, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x0, tokens, noise, t, a = (v.to(device) for v in (x0, tokens, noise, t, a))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = parts.unet(x_t, t, encoder_hidden_states=parts.prompt_encoder(tokens)).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(_params(parts), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema_params, _params(parts)):
                e.lerp_(p, 1 - config.ema_decay)
        done = step + 1
        if done % 10 == 0 or done == config.steps:
            ctx.log(done, loss=loss.item(), lr=opt.param_groups[0]["lr"])
        ctx.progress(done, config.steps, f"loss {loss.item():.4f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            ctx.save_checkpoint(
                {
                    "config_key": config.key(),
                    "unet": parts.unet.state_dict(),
                    "encoder": parts.prompt_encoder.state_dict(),
                    "ema_unet": ema.unet.state_dict(),
                    "ema_encoder": ema.prompt_encoder.state_dict(),
                    "optimizer": opt.state_dict(),
                },
                done,
            )
            if on_step is not None:
                on_step(done, ema)
    ema.info["training"] = {**asdict(config), "config_key": config.key()}
    return ema.eval()


def cache_root(ctx: RunContext) -> Path:
    return shared_cache_dir(ctx)


def base_model_name(config: PretrainConfig) -> str:
    return f"diffusion-base-{config.key()}"


def base_model(ctx: RunContext, smoke: bool = False, config: PretrainConfig | None = None) -> DiffusionParts:
    """The shared trained model for `config` (smoke: a seconds-long one), trained at most once."""
    config = config or (SMOKE_CONFIG if smoke else FULL_CONFIG)
    name = base_model_name(config)
    try:
        return load_parts(ctx.load_model(name))
    except (KeyError, FileNotFoundError, PermissionError):
        pass
    folder = cache_root(ctx) / "diffusion" / name
    if not (folder / ".complete").exists():
        from models.context import InMemoryRunContext

        # a private context: the base model's checkpoints must not mix with the calling job's; its progress
        # goes to the caller, and the caller's cancellation stops it (train_denoiser raises Cancelled)
        private = InMemoryRunContext(seed=config.seed, device=ctx.device)

        def forward(done: int, total: int, message: str) -> None:
            ctx.progress(done, total, f"base model: {message}")
            if ctx.cancelled():
                private.cancel()

        private.on_progress = forward
        stop_if_cancelled(ctx)
        parts = train_denoiser(private, config)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_parts(parts, tmp)
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    parts = load_parts(folder)
    try:
        ctx.register_model(name, folder, {"method": "diffusion-pretrain", **parts.info.get("training", {})})
    except (OSError, ValueError, PermissionError):
        pass  # a context that cannot register still gets the model
    return parts
