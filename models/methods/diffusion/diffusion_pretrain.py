"""diffusion-pretrain: the family's base model — a small prompt-conditioned DDPM (Ho, Jain & Abbeel,
"Denoising Diffusion Probabilistic Models", NeurIPS 2020; arXiv:2006.11239; reference code
https://github.com/hojonathanho/diffusion) on coloured 16×16 digits, trained with null-prompt dropout
so that classifier-free guidance (Ho & Salimans 2022) and APG can use it.

Mechanism. A noisy image x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε at a uniformly drawn timestep t ∈ {0..999} goes
through a U-Net that predicts the noise; the loss is the DDPM paper's simplified objective (its Eq. 14),

    L = E_{t, x₀, ε} ‖ε − ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, c)‖².

Ours: diffusers' `UNet2DConditionModel` (one resnet per block, 16→8→4 px, cross-attention at 8×8 and
4×4) conditioned through cross-attention on a prompt of three tokens [digit, colour, thickness] embedded
by a small learned encoder; the cosine ᾱ schedule (diffusers' `squaredcos_cap_v2`, Nichol & Dhariwal
2021) rather than the DDPM paper's linear one; the whole prompt is replaced by null tokens with
probability `null_prob` (what CFG's unconditional branch needs) and single attributes with
`attr_drop_prob`. AdamW with a 100-step linear warm-up and cosine decay, gradient clipping at 1 and an
EMA of the weights (the EMA is what is saved and sampled). Defaults (800 steps at batch 64, lr 2e-3, EMA
0.995) are sized for a few CPU minutes, not taken from the paper.

The job trains `models.diffusion.training.train_denoiser`, logs loss and learning rate, reports progress
every step, saves a sample grid (DDIM, `grid_steps` steps, CFG w = 3, one row per digit) at every checkpoint, saves the
model as a diffusers-style folder and registers it. It resumes from the run's last checkpoint (batches
are drawn from generators seeded by the step, so a resumed run ends with the same weights). Other
diffusion jobs get the same model through `base_model(ctx)` without retraining.
"""

from __future__ import annotations

from pydantic import Field

from models.context import RunContext
from models.diffusion.grids import image_grid
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.jobs import sample_classes
from models.diffusion.model import DiffusionParts, save_parts
from models.diffusion.training import FULL_CONFIG, PretrainConfig, train_denoiser
from models.params import ResumableParams, StepTrainingParams
from models.registry import method


class PretrainParams(StepTrainingParams, ResumableParams):
    widths: tuple[int, ...] = Field(FULL_CONFIG.widths, description="U-Net block widths (16→8→4 px)")
    steps: int = Field(FULL_CONFIG.steps, ge=1, le=200_000, description="optimizer steps")
    lr: float = Field(
        FULL_CONFIG.lr, gt=0, le=1.0, description="peak AdamW learning rate (100-step warm-up, then cosine decay)"
    )
    ema_decay: float = Field(FULL_CONFIG.ema_decay, ge=0, lt=1)
    null_prob: float = Field(FULL_CONFIG.null_prob, ge=0, le=1, description="whole-prompt dropout (for CFG)")
    attr_drop_prob: float = Field(FULL_CONFIG.attr_drop_prob, ge=0, le=1, description="per-attribute dropout")
    checkpoint_every: int = Field(
        FULL_CONFIG.checkpoint_every,
        ge=1,
        le=1_000_000,
        description="save a resumable checkpoint and a sample grid every N steps (and at the end)",
    )
    grid_per_class: int = Field(8, ge=1, le=32, description="images per digit in each sample grid")
    grid_steps: int = Field(20, ge=1, le=1000, description="DDIM steps of the sample grids")
    model_name: str = Field(
        "diffusion-digits",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="name to register the trained model under (each run adds a version)",
    )

    def config(self, seed: int) -> PretrainConfig:
        return PretrainConfig(
            widths=tuple(self.widths),
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            ema_decay=self.ema_decay,
            null_prob=self.null_prob,
            attr_drop_prob=self.attr_drop_prob,
            seed=seed,
            checkpoint_every=self.checkpoint_every,
        )


def _grid(parts: DiffusionParts, params: PretrainParams, seed: int) -> bytes:
    guidance = GuidanceSpec("cfg", 3.0) if parts.null_conditioning else GuidanceSpec("none")
    result, _ = sample_classes(parts, guidance, params.grid_per_class, steps=params.grid_steps, seed=seed)
    return image_grid(result.images, nrow=params.grid_per_class)


@method(
    "diffusion-pretrain",
    family="diffusion",
    task="train",
    paper="Denoising Diffusion Probabilistic Models (base model for the diffusion family)",
    datasets=("image-class",),
    params=PretrainParams,
    tiny={"widths": [8, 16], "steps": 3, "batch_size": 4, "grid_per_class": 1, "grid_steps": 1},
)
def run(ctx: RunContext, params: PretrainParams) -> None:
    """Train the small prompt-conditioned diffusers U-Net on coloured digits and register it."""
    config = params.config(ctx.seed)

    def on_checkpoint(step: int, ema: DiffusionParts) -> None:
        ctx.save_artifact(f"samples/step-{step:06d}.png", _grid(ema.eval(), params, ctx.seed), kind="image")
        ema.unet.train()

    parts = train_denoiser(ctx, config, on_step=on_checkpoint)
    folder = save_parts(parts, ctx.workdir / "model")
    ctx.save_artifact("samples/final.png", _grid(parts, params, ctx.seed), kind="image")
    lineage = {
        "method": "diffusion-pretrain",
        "job_id": ctx.job_id,
        "parent": None,
        "dataset": ctx.dataset.name if ctx.dataset else None,
        "seed": ctx.seed,
        **parts.info.get("training", {}),
    }
    ref = ctx.register_model(params.model_name, folder, lineage)
    ctx.progress(config.steps, config.steps, f"registered {ref}")
