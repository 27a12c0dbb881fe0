"""One-step distillation by variational score distillation: SwiftBrush (Nguyen & Tran, CVPR 2024)
and SNOOPI's PG-SB (Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation with
Proper Guidance", 2024, §3), which differ only in how the guidance scale κ is chosen.

* Student (SwiftBrush Eq. 6): a U-Net initialised from the teacher maps pure noise z to
  x̂₀ = (z − σ_T ε_θ(z, T, c)) / α_T in one forward. The reference uses SD's ᾱ_T = 0.0047 at
  T = 999; our cosine schedule's ᾱ_999 ≈ 2e−9 would blow x̂₀ up, so T is the timestep whose ᾱ is
  nearest 0.0047 (t = 955) and α_T, σ_T are the schedule's own values there.
  Even there the tiny teacher's ε error, amplified by σ_T/α_T ≈ 14, leaves the initial student at
  54% clipped pixels; probing the *undistilled* student at ᾱ_T ∈ {0.0047, 0.02, 0.05, 0.1, 0.2}
  (before any comparison was run) gave the best start at ᾱ_T = 0.05 (t = 854, FD 108 vs 189), so
  that is our T, the same for every arm.
* Guided predictions: ε̂^κ = ε(·, ∅) + κ(ε(·, c) − ε(·, ∅)) (`guidance.cfg`) for the frozen teacher ψ and
  the LoRA teacher π — one peft-adapted copy of the base U-Net, adapters disabled for ψ, enabled for π.
* Student loss (VSD, SwiftBrush Eq. 5): x̂_t = α_t x̂₀ + σ_t ε, t ~ U{20..980};
  g = σ_t²(ε̂_ψ^κ − ε̂_π^κ);  L = ½·mean‖x̂₀ − sg(x̂₀ − g)‖²,  so ∂L/∂x̂₀ = g / numel.
* LoRA loss (alternating): ‖α_t(ε_π(sg x̂_t, t, c′) − ε)‖², fresh t ~ U{0..999} and ε, c′ = ∅ with
  probability 0.1 — the LoRA teacher learns the score of the student's own samples.
* SB: fixed κ. PG-SB (SNOOPI §3.2): κ ~ U(κ_min, κ_max) drawn per sample and used by *both* teachers
  (the paper: U(0.5, 4) for SD1.5/2.1). κ is drawn from its own generator, so a range [w, w] is
  exactly fixed-scale SwiftBrush.

Reconstructed at this scale (the paper's settings are for SD): AdamW lr 1e-5 for the student (the
reference's 1e-6 barely moves a tiny model in a hundred steps; 3e-5 and 1e-4 oversaturated it in a
60-step probe), LoRA rank 16 with scaling 2
(the reference's 128/64) on attention *and* resnet convs — our U-Net has no attention at 16×16, so
a LoRA on `to_q, to_v` alone could not follow the student at full resolution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from models.context import RunContext, stop_if_cancelled
from models.diffusion.data import coloured_digits, drop_tokens
from models.diffusion.guidance import cfg
from models.diffusion.model import DiffusionParts, training_scheduler
from models.diffusion.one_step import OneStep
from models.diffusion.sampling import SampleRequest, attention_processor

STUDENT_ALPHA_BAR_T = 0.05  # ours: see the module docstring
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def lora_teacher(
    unet: UNet2DConditionModel, rank: int = 16, alpha: float = 32.0, targets: tuple[str, ...] = LORA_TARGETS
) -> UNet2DConditionModel:
    """A copy of the teacher with a peft LoRA adapter (B = 0, so it starts equal to the teacher); only
    the adapter trains. `disable_adapters()` on it gives the frozen teacher ψ, `enable_adapters()` π."""
    model = copy.deepcopy(unet)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))
    return model


def guided_eps(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    kappa: torch.Tensor,
) -> torch.Tensor:
    """ε̂^κ with one batched forward on [cond, uncond]; κ is a scalar or per sample [B, 1, 1, 1]."""
    out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
    eps_c, eps_u = out.chunk(2)
    return cfg(eps_c, eps_u, kappa)


def teacher_predictions(
    teachers: UNet2DConditionModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    kappa: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂_ψ^κ, ε̂_π^κ): adapters off for the frozen teacher, on for the LoRA teacher."""
    with torch.no_grad():
        teachers.disable_adapters()
        frozen = guided_eps(teachers, x_t, t, cond, uncond, kappa)
        teachers.enable_adapters()
        lora = guided_eps(teachers, x_t, t, cond, uncond, kappa)
    return frozen, lora


def vsd_gradient(eps_frozen: torch.Tensor, eps_lora: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """g = σ_t²(ε̂_ψ − ε̂_π): the VSD gradient with respect to x̂₀ (NaNs zeroed, as the reference)."""
    return torch.nan_to_num(sigma_t**2 * (eps_frozen - eps_lora))


def vsd_loss(x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """½·mean‖x̂₀ − sg(x̂₀ − g)‖², whose gradient with respect to x̂₀ is g / x̂₀.numel()."""
    return 0.5 * F.mse_loss(x0, (x0 - gradient).detach())


def sample_kappa(n: int, kappa_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per-sample guidance scales κ ~ U(lo, hi), [n, 1, 1, 1]; lo = hi gives exactly that scale."""
    lo, hi = kappa_range
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).view(n, 1, 1, 1)


@dataclass(frozen=True)
class VSDConfig:
    """SwiftBrush when `kappa_range` is (w, w); PG-SB with a proper range."""

    kappa_range: tuple[float, float] = (0.5, 4.0)
    alpha_bar_T: float = STUDENT_ALPHA_BAR_T
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 0.0  # the student's AdamW weight decay
    lora_lr: float = 1e-3
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    t_range: tuple[int, int] = (20, 981)  # the reference's [0.02, 0.981)·1000
    lora_null_prob: float = 0.1
    attr_drop_prob: float = 0.3
    seed: int = 0


@dataclass
class VSDTrace:
    vsd_loss: list[float] = field(default_factory=list)
    lora_loss: list[float] = field(default_factory=list)


def train_vsd(
    ctx: RunContext,
    teacher: DiffusionParts,
    config: VSDConfig,
    on_eval: Callable[[int, DiffusionParts], None] | None = None,
    eval_every: int = 0,
) -> tuple[DiffusionParts, VSDTrace]:
    """Distil `teacher` into a one-step student (returned in eval mode, sharing the frozen prompt encoder)."""
    torch.manual_seed(config.seed)
    schedule = training_scheduler()
    alphas = schedule.alphas_cumprod
    one_step = OneStep.for_schedule(alphas, config.alpha_bar_T)
    student = DiffusionParts(
        copy.deepcopy(teacher.unet),
        teacher.scheduler_config,
        teacher.prompt_encoder,
        {
            **teacher.info,
            "prediction_type": "epsilon",
            "one_step": {
                "timestep": one_step.timestep,
                "alpha": one_step.alpha,
                "sigma": one_step.sigma,
                "kappa_range": list(config.kappa_range),
            },
        },
    )
    teachers = lora_teacher(teacher.unet, config.lora_rank, config.lora_alpha, config.lora_targets)
    encoder = teacher.prompt_encoder.eval()
    encoder.requires_grad_(False)
    lora_params = [p for p in teachers.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(student.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    opt_lora = torch.optim.AdamW(lora_params, lr=config.lora_lr, weight_decay=0.0)
    prompts = coloured_digits("train", 1, seed=config.seed).tokens
    null = torch.tensor(encoder.null_tokens)
    student.unet.train()
    teachers.train()
    trace = VSDTrace()
    for step in range(config.steps):
        stop_if_cancelled(ctx)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        g_kappa = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 500_000_000)
        b = config.batch_size
        tokens = drop_tokens(prompts[torch.randint(0, len(prompts), (b,), generator=g)], 0.0, config.attr_drop_prob, g)
        with torch.no_grad():
            cond, uncond = encoder(tokens), encoder(null.expand(b, -1))
        x0 = one_step.generate(student.unet, torch.randn(b, 3, 16, 16, generator=g), cond)
        # -- student step (VSD) --
        t = torch.randint(*config.t_range, (b,), generator=g)
        a_t = alphas[t].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        x_t = a_t.sqrt() * x0.detach() + (1 - a_t).sqrt() * noise
        kappa = sample_kappa(b, config.kappa_range, g_kappa)
        eps_frozen, eps_lora = teacher_predictions(teachers, x_t, t, cond, uncond, kappa)
        loss = vsd_loss(x0, vsd_gradient(eps_frozen, eps_lora, (1 - a_t).sqrt()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.unet.parameters(), 1.0)
        opt.step()
        # -- LoRA teacher step on the student's (detached) samples --
        t2 = torch.randint(0, schedule.config.num_train_timesteps, (b,), generator=g)
        a2 = alphas[t2].view(-1, 1, 1, 1)
        noise2 = torch.randn(x0.shape, generator=g)
        x_t2 = a2.sqrt() * x0.detach() + (1 - a2).sqrt() * noise2
        context = uncond if torch.rand((), generator=g).item() < config.lora_null_prob else cond
        teachers.enable_adapters()
        pred = teachers(x_t2, t2, encoder_hidden_states=context).sample
        loss_lora = F.mse_loss(a2.sqrt() * pred, a2.sqrt() * noise2)
        opt_lora.zero_grad(set_to_none=True)
        loss_lora.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt_lora.step()
        trace.vsd_loss.append(loss.item())
        trace.lora_loss.append(loss_lora.item())
        done = step + 1
        if done % 10 == 0 or done == config.steps:
            ctx.log(done, vsd_loss=loss.item(), lora_loss=loss_lora.item())
        ctx.progress(done, config.steps, f"vsd {loss.item():.3g} lora {loss_lora.item():.3g}")
        if on_eval is not None and eval_every and (done % eval_every == 0 or done == config.steps):
            on_eval(done, student.eval())
            student.unet.train()
    return student.eval(), trace


@torch.no_grad()
def one_step_sample(
    student: DiffusionParts,
    tokens: torch.Tensor,
    seed: int,
    negative: torch.Tensor | None = None,
    alpha: float = 0.0,
    cfg_scale: float | None = None,
) -> torch.Tensor:
    """One-step images (model space, unclipped) for prompt tokens [N, 3].

    `negative` (token ids [3]) acts through NASA in every cross-attention layer with strength `alpha`
    (SNOOPI Eq. 10, `models.diffusion.nasa`), or, with `cfg_scale`, through negative-prompt CFG on
    the one-step outputs x̂₀(neg) + s·(x̂₀(c) − x̂₀(neg)) — the paper's baseline for one-step models.
    """
    one_step = OneStep(**{k: student.info["one_step"][k] for k in ("timestep", "alpha", "sigma")})
    noise = torch.randn(len(tokens), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    cond = student.encode(tokens)
    if negative is None:
        return one_step.generate(student.unet, noise, cond)
    if cfg_scale is not None:
        neg = student.encode(negative.view(1, -1)).expand(len(tokens), -1, -1)
        return cfg(one_step.generate(student.unet, noise, cond), one_step.generate(student.unet, noise, neg), cfg_scale)
    request = SampleRequest(
        negative_prompt=[int(v) for v in negative], attention="nasa", attention_params={"alpha": alpha}
    )
    with attention_processor(student, request):
        return one_step.generate(student.unet, noise, cond)
