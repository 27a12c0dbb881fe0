"""ict: improved consistency training — Song & Dhariwal, "Improved Techniques for Training Consistency
Models" (ICLR 2024; arXiv:2310.14189), against the original consistency-training recipe of Song, Dhariwal,
Chen & Sutskever, "Consistency Models" (ICML 2023; arXiv:2303.01469; reference code
https://github.com/openai/consistency_models, `cm/karras_diffusion.py`). No official iCT code was
released; https://github.com/Kinyugo/consistency_models (`ImprovedConsistencyTraining`) is a community
implementation of the same recipe. Both recipes train from scratch, here on coloured 16×16 digits with
the family's prompt-conditioned U-Net.

Consistency function (both papers, with EDM's boundary scalings):

    f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, c_noise(σ)),
    c_skip = σ_d²/((σ − σ_min)² + σ_d²),  c_out = σ_d·(σ − σ_min)/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),

so f_θ(x, σ_min) = x exactly; σ_min = 0.002, σ_max = 80, σ_d = 0.5. c_noise = 250·ln σ feeds the U-Net's
positional time embedding (as the CM reference code rescales σ for its U-Net).

Training pairs adjacent noise levels σ_i < σ_{i+1} of an N-level Karras grid (ρ = 7), noising the same
image with the same z:

    L = λ(σ_i) · d( f_θ(x + σ_{i+1}·z, σ_{i+1}),  sg f_θ⁻(x + σ_i·z, σ_i) )

* iCT: the teacher θ⁻ is the student itself under stop-gradient, no EMA (§3.2); pseudo-Huber
  d(a, b) = √(‖a − b‖² + c²) − c with c = 0.00054·√dim (§3.3); λ(σ_i) = 1/(σ_{i+1} − σ_i) (§3.1);
  i drawn from the discretised lognormal p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) −
  erf((ln σ_i − P_mean)/(√2·P_std)) with P_mean = −1.1, P_std = 2 (§3.5); N doubles over training,
  N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 with K′ = ⌊K/(log₂⌊s1/s0⌋ + 1)⌋, s0 = 10, s1 = 1280 (§3.4). The teacher
  pass reuses the student's dropout mask (shared RNG state), as the paper prescribes.
* CT: an EMA teacher with μ(k) = exp(s0·ln μ0 / N(k)), μ0 = 0.95; N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²)
  − 1⌉ + 1 with s0 = 2, s1 = 150; i uniform; λ = 1; squared L2 instead of LPIPS (LPIPS needs downloaded
  weights).

Sampling: one step is f_θ(σ_max·z, σ_max); two steps re-noise that output to σ = 0.821 (iCT's
intermediate point) and apply f again.

Deviations (CPU scale): K = 400 iterations at batch 64 by default (the paper: 400k at batch 512–1024),
lr 1e-3 (the paper: 1e-4) with RAdam for iCT and Adam for CT, dropout 0 by default (the paper's 0.3
regularises its long runs; ours underfit), no evaluation EMA (the paper's 0.99993), positional rather
than Fourier time embedding.

Reproduction: both recipes for 300 iterations at batch 32 (U-Net widths 16, 32, 32), 3 seeds; one- and
two-step samples of 20 images per digit scored by the evaluation kit. The metric is the one-step
Fréchet distance on the kit's digit-classifier features (iCT vs CT, one value per seed); the claim's
other condition is that iCT's two-step FD, averaged over seeds, is below its one-step FD.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.diffusion.data import coloured_digits, drop_tokens
from models.diffusion.evaluation import EvaluationKit
from models.diffusion.grids import image_grid, labelled_grids
from models.diffusion.model import DiffusionParts, new_parts, save_parts
from models.params import StepTrainingParams
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
P_MEAN, P_STD = -1.1, 2.0
TWO_STEP_SIGMA = 0.821
Recipe = Literal["ict", "ct"]


def karras_sigmas(n: int) -> torch.Tensor:
    """n noise levels σ_0 = σ_min < … < σ_{n−1} = σ_max (EDM Eq. 5, ρ = 7), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + ramp * (hi - lo)) ** RHO


def ict_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling discretisation N(k) (Eq. 8)."""
    k_prime = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(1, k_prime)), s1) + 1


def ct_levels(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """The original CT schedule N(k) (CM Appendix C)."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_ema_decay(n: int, s0: int = 2, mu0: float = 0.95) -> float:
    return math.exp(s0 * math.log(mu0) / n)


def lognormal_index_probs(sigmas: torch.Tensor) -> torch.Tensor:
    """p(i) for i = 0..N−2 (iCT §3.5): the lognormal mass between σ_i and σ_{i+1}, normalised."""
    cdf = torch.erf((sigmas.log() - P_MEAN) / (math.sqrt(2) * P_STD))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """√(‖a−b‖² + c²) − c per sample, c = 0.00054·√dim (iCT §3.3)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


def boundary_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) in float64; σ_min is rounded to σ's dtype first, so σ = σ_min gives
    c_skip = 1 and c_out = 0 exactly whatever precision the caller's σ has."""
    sigma_min = torch.tensor(SIGMA_MIN, dtype=sigma.dtype).double()
    sigma = sigma.double()
    c_skip = SIGMA_DATA**2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA**2)
    c_out = SIGMA_DATA * (sigma - sigma_min) / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out, c_in


def consistency_fn(parts: DiffusionParts, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """f_θ(x, σ) with σ per sample (float64 scalings, exact at σ_min)."""
    c_skip, c_out, c_in = (s.view(-1, 1, 1, 1) for s in boundary_scalings(sigma))
    out = parts.unet(
        (c_in * x).float(), (250 * sigma.double().log()).float(), encoder_hidden_states=parts.prompt_encoder(tokens)
    ).sample
    return (c_skip * x.double() + c_out * out.double()).to(x.dtype)


@torch.no_grad()
def consistency_sample(parts: DiffusionParts, tokens: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """1- or 2-step sampling; returns model-space images (unclipped)."""
    g = torch.Generator().manual_seed(seed)
    n = len(tokens)
    x = torch.randn(n, 3, 16, 16, generator=g) * SIGMA_MAX
    x = consistency_fn(parts, x, torch.full((n,), SIGMA_MAX), tokens)
    for sigma in (TWO_STEP_SIGMA,)[: steps - 1]:
        x = x + math.sqrt(sigma**2 - SIGMA_MIN**2) * torch.randn(x.shape, generator=g)
        x = consistency_fn(parts, x, torch.full((n,), sigma), tokens)
    return x


@dataclass(frozen=True)
class ConsistencyConfig:
    recipe: Recipe = "ict"
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    widths: tuple[int, ...] = (16, 32, 64)
    dropout: float = 0.0
    seed: int = 0


def train_consistency(ctx: RunContext, config: ConsistencyConfig) -> tuple[DiffusionParts, list[float]]:
    """Consistency training from scratch under one recipe; returns the student and its loss curve. Reports
    progress every iteration and raises `Cancelled` at the next one once the run is cancelled."""
    data = coloured_digits("train", 2, seed=config.seed)
    torch.manual_seed(config.seed)
    student = new_parts(config.widths, null_prob=0.1, attr_drop_prob=0.3, dropout=config.dropout)
    student.info.update(
        prediction_type="consistency",
        consistency={"recipe": config.recipe, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
    )
    teacher = copy.deepcopy(student) if config.recipe == "ct" else student
    params = list(student.unet.parameters()) + list(student.prompt_encoder.parameters())
    optimizer = torch.optim.RAdam if config.recipe == "ict" else torch.optim.Adam
    opt = optimizer(params, lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    student.unet.train()
    for k in range(config.steps):
        stop_if_cancelled(ctx)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + k)
        n_levels = (ict_levels if config.recipe == "ict" else ct_levels)(k, config.steps)
        sigmas = karras_sigmas(n_levels)
        if config.recipe == "ict":
            i = torch.multinomial(lognormal_index_probs(sigmas).float(), config.batch_size, True, generator=g)
        else:
            i = torch.randint(0, n_levels - 1, (config.batch_size,), generator=g)
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        x0, tokens = data.images[idx], drop_tokens(data.tokens[idx], 0.1, 0.3, g)
        z = torch.randn(x0.shape, generator=g)
        s_lo, s_hi = sigmas[i], sigmas[i + 1]
        rng = torch.get_rng_state()  # iCT: teacher and student passes share the dropout mask
        pred = consistency_fn(student, x0 + s_hi.float().view(-1, 1, 1, 1) * z, s_hi, tokens)
        with torch.no_grad():
            torch.set_rng_state(rng)
            target = consistency_fn(teacher, x0 + s_lo.float().view(-1, 1, 1, 1) * z, s_lo, tokens)
        if config.recipe == "ict":
            loss = (pseudo_huber(pred, target) / (s_hi - s_lo).float()).mean()
        else:
            loss = (pred - target).flatten(1).pow(2).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if config.recipe == "ct":
            mu = ct_ema_decay(n_levels)
            with torch.no_grad():
                for t_p, s_p in zip(
                    list(teacher.unet.parameters()) + list(teacher.prompt_encoder.parameters()), params
                ):
                    t_p.lerp_(s_p, 1 - mu)
        losses.append(loss.item())
        done = k + 1
        if done % 10 == 0 or done == config.steps:
            ctx.log(done, **{f"{config.recipe}_loss": loss.item(), f"{config.recipe}_levels": n_levels})
        ctx.progress(done, config.steps, f"{config.recipe} loss {loss.item():.4g}")
    return student.eval(), losses


class ICTParams(StepTrainingParams):
    recipe: Recipe = Field("ict", description="ict (the paper's) or ct (original consistency training)")
    steps: int = Field(400, ge=1, le=200_000, description="K training iterations")
    batch_size: int = Field(64, ge=2, le=4096, description="images per iteration")
    dropout: float = Field(0.0, ge=0, lt=1)
    per_class: int = Field(8, ge=1, le=100, description="images per digit in the sample grid")

    def config(self, seed: int) -> ConsistencyConfig:
        return ConsistencyConfig(
            self.recipe,
            self.steps,
            self.batch_size,
            self.lr,
            weight_decay=self.weight_decay,
            dropout=self.dropout,
            seed=seed,
        )


@method(
    "ict",
    family="diffusion",
    task="train",
    paper="Improved Techniques for Training Consistency Models",
    datasets=("image-class",),
    params=ICTParams,
    tiny={"steps": 2, "batch_size": 2, "per_class": 1},
)
def run(ctx: RunContext, params: ICTParams) -> None:
    """Consistency training from scratch (iCT or original CT); saves 1- and 2-step samples and registers the model."""
    parts, _ = train_consistency(ctx, params.config(ctx.seed))
    tokens = _class_tokens(params.per_class)
    for steps in (1, 2):
        images = ((consistency_sample(parts, tokens, steps, ctx.seed) + 1) / 2).clamp(0, 1)
        ctx.save_artifact(f"samples_{steps}step.png", image_grid(images, nrow=params.per_class), kind="image")
    folder = save_parts(parts, ctx.workdir / "model")
    ctx.register_model(f"ict-{ctx.job_id}", folder, {"method": "ict", "recipe": params.recipe})


def _class_tokens(per_class: int) -> torch.Tensor:
    digits = torch.arange(10).repeat_interleave(per_class)
    return torch.stack([digits, torch.full_like(digits, 6), torch.full_like(digits, 3)], 1)


@reproduction(
    "ict",
    claim="iCT beats original consistency training in one step, and two steps improve on one",
    metric="FD on classifier features, 1 step",
    direction="lower",
    baseline="ct",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    steps, batch, per_class = (3, 8, 2) if smoke else (300, 32, 20)
    widths = (8, 16) if smoke else (16, 32, 32)
    seeds = seeds_for(seed, smoke)
    kit = EvaluationKit.build(ctx, smoke)
    tokens = _class_tokens(per_class)
    runs = [(s, recipe) for s in seeds for recipe in ("ict", "ct")]
    # scores[f"{recipe}_{n}step"][i]: the scores of seed seeds[i]
    scores: dict[str, list[dict[str, float]]] = {}
    curves, grids = {}, {}
    for s, recipe in sweep(ctx, runs, label=lambda run: f"{run[1]} seed {run[0]}"):
        parts, losses = train_consistency(ctx, ConsistencyConfig(recipe, steps, batch, widths=widths, seed=s))
        if s == seed:
            curves[recipe] = (list(range(1, len(losses) + 1)), losses)
        for n_steps in (1, 2):
            raw = consistency_sample(parts, tokens, n_steps, s + 17)
            images = ((raw + 1) / 2).clamp(0, 1)
            scores.setdefault(f"{recipe}_{n_steps}step", []).append(kit.score(images, raw, tokens[:, 0]))
            if s == seed:
                grids[f"{recipe.upper()} {n_steps}-step"] = images[:: max(1, per_class // 4)][:40]
    ctx.save_artifact("ict_vs_ct.png", labelled_grids(grids, nrow=4, ncols=2), kind="image")
    ctx.save_artifact("ict_losses.png", curves_figure({"training loss": curves}, "iteration", logy=True), kind="plot")
    fd_seeds = {k: [r["fd"] for r in v] for k, v in scores.items()}
    fd = {k: statistics.fmean(v) for k, v in fd_seeds.items()}
    two_step = fd["ict_2step"] < fd["ict_1step"]
    note = (
        f"{len(seeds)} seed(s); K={steps} iterations at batch {batch} (the paper: 400k at 512–1024), U-Net "
        f"widths {widths}, dropout 0 for both recipes (the paper's 0.3 regularises 400k-iteration runs; ours "
        f"underfit), no evaluation EMA. Mean FD 1-step iCT {fd['ict_1step']:.1f} vs CT {fd['ct_1step']:.1f}; "
        f"2-step iCT {fd['ict_2step']:.1f}, CT {fd['ct_2step']:.1f}. "
        + (
            "Two steps improve on one."
            if two_step
            else "Two steps do not improve on one; at this budget the models are far from converged, so this "
            "is weak evidence either way."
        )
    )
    mean_scores = {k: {m: statistics.fmean(r[m] for r in v) for m in v[0]} for k, v in scores.items()}
    return Outcome(
        ours=fd_seeds["ict_1step"],
        baseline=fd_seeds["ct_1step"],
        holds=two_step,
        note=note,
        details={"scores": mean_scores, "fd_per_seed": fd_seeds, "seeds": seeds},
    )
