"""diffusion-pretrain: the family's base model — a small prompt-conditioned DDPM (Ho et al. 2020,
ε-prediction loss Eq. 14) on coloured 16×16 digits, trained with null-prompt dropout so that
classifier-free guidance (Ho & Salimans 2022) and APG can use it.

The job trains `models.diffusion.training.train_denoiser` (resumable through the run context's
checkpoints), logs loss and learning rate, saves a sample grid (DDIM, CFG w=3, one row per digit)
at every checkpoint, saves the model as a diffusers-style folder and registers it. Other diffusion
jobs get the same model through `base_model(ctx)` without retraining.
"""

from __future__ import annotations

from pydantic import Field

from models.context import RunContext, cpu_threads
from models.diffusion.grids import image_grid
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.jobs import sample_classes
from models.diffusion.model import DiffusionParts, save_parts
from models.diffusion.training import FULL_CONFIG, PretrainConfig, train_denoiser
from models.registry import MethodParams, method


class PretrainParams(MethodParams):
    widths: tuple[int, ...] = Field(FULL_CONFIG.widths, description="U-Net block widths (16→8→4 px)")
    steps: int = Field(FULL_CONFIG.steps, ge=1, le=200_000)
    batch_size: int = Field(FULL_CONFIG.batch_size, ge=1, le=4096)
    lr: float = Field(FULL_CONFIG.lr, gt=0, le=1.0)
    ema_decay: float = Field(FULL_CONFIG.ema_decay, ge=0, lt=1)
    null_prob: float = Field(FULL_CONFIG.null_prob, ge=0, le=1, description="whole-prompt dropout (for CFG)")
    attr_drop_prob: float = Field(FULL_CONFIG.attr_drop_prob, ge=0, le=1, description="per-attribute dropout")
    checkpoint_every: int = Field(FULL_CONFIG.checkpoint_every, ge=1)
    grid_per_class: int = Field(8, ge=1, le=32)

    def config(self, seed: int) -> PretrainConfig:
        return PretrainConfig(
            widths=tuple(self.widths),
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            ema_decay=self.ema_decay,
            null_prob=self.null_prob,
            attr_drop_prob=self.attr_drop_prob,
            seed=seed,
            checkpoint_every=self.checkpoint_every,
        )


def _grid(parts: DiffusionParts, per_class: int, seed: int) -> bytes:
    guidance = GuidanceSpec("cfg", 3.0) if parts.null_conditioning else GuidanceSpec("none")
    result, _ = sample_classes(parts, guidance, per_class, steps=20, seed=seed)
    return image_grid(result.images, nrow=per_class)


@method(
    "diffusion-pretrain",
    family="diffusion",
    task="train",
    paper="Denoising Diffusion Probabilistic Models (base model for the diffusion family)",
    datasets=("image-class",),
    params=PretrainParams,
)
def run(ctx: RunContext, params: PretrainParams) -> None:
    """Train the small prompt-conditioned diffusers U-Net on coloured digits and register it."""
    config = params.config(ctx.seed)
    with cpu_threads(ctx.resources):

        def on_checkpoint(step: int, ema: DiffusionParts) -> None:
            ctx.save_artifact(
                f"samples/step-{step:06d}.png", _grid(ema.eval(), params.grid_per_class, ctx.seed), kind="image"
            )
            ema.unet.train()

        parts = train_denoiser(ctx, config, on_step=on_checkpoint)
        folder = save_parts(parts, ctx.workdir / "model")
        ctx.save_artifact("samples/final.png", _grid(parts, params.grid_per_class, ctx.seed), kind="image")
        ref = ctx.register_model(
            f"diffusion-pretrain-{ctx.job_id}",
            folder,
            {"method": "diffusion-pretrain", **parts.info.get("training", {})},
        )
        ctx.progress(config.steps, config.steps, f"registered {ref}")
