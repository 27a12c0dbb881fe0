"""HPM: masked image modelling with hard-patch mining, against MAE's uniform random masking.

Paper: Haochen Wang, Junsong Fan, Yuxi Wang, Kaiyou Song, Tiancai Wang, Xiangyu Zhang and Zhaoxiang
Zhang, "Bootstrap Masked Visual Modeling via Hard Patches Mining" (arXiv 2312.13714, the journal
extension, with video, of Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023;
equation numbers below are the CVPR paper's). Public code: https://github.com/Haochen-Wang409/HPM.
Baseline: MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

MAE masks a fixed share of patches at random and regresses their pixels; the model never chooses
what is hard. HPM adds a second decoder, the *loss predictor*, that guesses each patch's
reconstruction loss, and lets an EMA teacher's guesses pick the mask:

- reconstruction (MAE, eq. 1): ℓ_i = mean over the pixels of patch i of (x̂_i − x_i)², averaged over
  the masked patches only;
- relative loss-prediction objective (eq. 5): for masked patches i ≠ j of one image with ℓ_i ≠ ℓ_j,
  BCE(σ(ℓ̂_j − ℓ̂_i), 1[ℓ_j > ℓ_i]), averaged over those ordered pairs; ℓ is detached, so only the
  predictor learns from it, and only the ranking of ℓ matters (any increasing map of the targets
  gives the same loss). The absolute variant (MSE to per-image standardised ℓ) is kept as an option;
- easy-to-hard masking (Sec. 3.3): the teacher sees the whole image and predicts ℓ̂ for every patch;
  with N_m = L − ⌊L(1 − r)⌋ masked patches, the α_t·N_m patches of highest ℓ̂ are masked and the
  rest of the mask is drawn uniformly among the others, α_t = α_max·(t + 1)/T (α_max = 0.5).
  α = 0 is exactly MAE's random masking (a unit test).

Total loss L_rec + L_pred. Read against `Haochen-Wang409/HPM` (`models_mae_learn_loss.py`:
`generate_mask`, `forward_learning_loss`; `engine_pretrain.py`): the teacher is an EMA of the student,
queried with no patch masked; the predictor has its own decoder blocks fed the same tokens as the
reconstructor. Deviations, all for a few CPU minutes on digits: 16×16 digits cut into 4×4 patches
(16 patches, 12 masked; 32×32 digits with 64 patches would cost 3× the CPU time), a 3-block,
48-wide ViT with 1-block, 32-wide decoders built from torch's `TransformerEncoderLayer` (pre-norm,
GELU) with learnt position embeddings (the reference uses ViT-B, timm blocks, fixed sin-cos ones);
the probe reads the mean of the patch tokens (MAE's probe reads the class token); the decoder sees
tokens in patch order (the reference puts visible tokens first — attention is permutation-equivariant
and each token carries its position, so this changes nothing but the bookkeeping); the predictor's
last layer outputs one value per patch (the reference averages a p²C-wide output); the pair BCE is
the logits form (the reference adds 1e-6 inside the logs); EMA decay 0.95 instead of 0.999→0.9999
because the whole run is ~130 steps, and a teacher that slow would still be the random
initialisation when the mask starts to follow it. Schedule: AdamW (β = 0.9, 0.95; weight decay
0.05) at a peak 1.5e-3 with 2 warm-up epochs then half-cosine, batch 128, 15 epochs, views from a
random resized crop of strength 0.5 (the reference: ViT-B/16, base lr 1.5e-4, weight decay 0.05,
800 epochs with 40 of warm-up).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.diffusion.grids import image_grid
from models.params import EpochTrainingParams, ResumableParams
from models.registry import method
from models.representation.augment import ViewRecipe, image_splits, random_view
from models.representation.contrastive import resume, training_state
from models.representation.evaluation import linear_probe_accuracy
from models.representation.job import EmbeddingPlotParams, finish_representation_job
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep

PredictorLoss = Literal["relative", "absolute"]


# -- patches and masks ---------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] → [B, L, p·p·C], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(p: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    b, n, _ = p.shape
    side = int(math.isqrt(n))
    x = p.reshape(b, side, side, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, side * patch, side * patch)


def masked_count(num_patches: int, mask_ratio: float) -> int:
    """N_m as the reference counts it: L minus the ⌊L(1 − r)⌋ kept patches."""
    return num_patches - int(num_patches * (1.0 - mask_ratio))


def hard_patch_mask(
    predicted_loss: torch.Tensor, mask_ratio: float, hard_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Boolean [B, L] mask (True = masked) with exactly N_m masked patches per image.

    The ⌊hard_fraction·N_m⌋ patches of highest predicted loss are always masked; the rest of the
    mask is a uniform random subset of the other patches (the top N_m of i.i.d. uniform scores).
    At hard_fraction = 0 this is MAE's uniform random masking, draw for draw.
    """
    b, length = predicted_loss.shape
    n_masked = masked_count(length, mask_ratio)
    n_hard = int(n_masked * hard_fraction)
    score = torch.rand(b, length, generator=generator).to(predicted_loss.device)
    if n_hard > 0:
        hardest = predicted_loss.topk(n_hard, dim=1).indices
        score = score.scatter(1, hardest, 2.0)  # above every uniform draw
    chosen = score.topk(n_masked, dim=1).indices
    return torch.zeros(b, length, dtype=torch.bool, device=predicted_loss.device).scatter(1, chosen, True)


def hard_fraction_at(epoch: int, epochs: int, hard_max: float) -> float:
    """Easy-to-hard schedule α_t = α_max·(t + 1)/T (t counted from 0)."""
    return hard_max * (epoch + 1) / epochs


# -- losses ----------------------------------------------------------------------------------------


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ℓ_i over masked patches, ℓ for every patch [B, L]), ℓ_i the per-patch pixel MSE."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1), per_patch


def relative_prediction_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ordered masked pairs (i, j) with ℓ_i ≠ ℓ_j of BCE(σ(ℓ̂_j − ℓ̂_i), 1[ℓ_j > ℓ_i])."""
    target = target.detach()
    logits = predicted[:, None, :] - predicted[:, :, None]  # [B, i, j] = ℓ̂_j − ℓ̂_i
    label = (target[:, None, :] > target[:, :, None]).to(predicted.dtype)
    valid = mask[:, None, :] & mask[:, :, None] & (target[:, None, :] != target[:, :, None])
    bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1)


def absolute_prediction_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE to the per-image standardised targets, over masked patches (the paper's ablation)."""
    t = target.detach()
    m = mask.to(t.dtype)
    count = m.sum(1, keepdim=True).clamp_min(2)
    mean = (t * m).sum(1, keepdim=True) / count
    var = ((t - mean).pow(2) * m).sum(1, keepdim=True) / (count - 1)
    z = (t - mean) / (var + 1e-6).sqrt()
    return ((predicted - z).pow(2) * m).sum() / m.sum().clamp_min(1)


# -- the model -------------------------------------------------------------------------------------


def transformer(dim: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder on the visible patches; a reconstruction decoder and a loss-predictor decoder on all."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        channels: int = 1,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        decoder_dim: int = 48,
        decoder_depth: int = 2,
    ):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.num_patches = (image_size // patch_size) ** 2
        patch_dim = patch_size * patch_size * channels
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, dim))
        self.encoder = transformer(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, decoder_dim))
        self.reconstructor = transformer(decoder_dim, decoder_depth, heads)
        self.reconstructor_head = nn.Sequential(nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, patch_dim))
        self.loss_predictor = transformer(decoder_dim, decoder_depth, heads)
        self.loss_predictor_head = nn.Sequential(nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, 1))

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + visible, dim] tokens (cls first); `mask` must mask the same count in every image."""
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed[:, 1:]
        if mask is not None:
            tokens = tokens[~mask].reshape(len(x), -1, tokens.shape[-1])
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        return self.norm(self.encoder(torch.cat([cls, tokens], 1)))

    def decoder_tokens(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, 1 + L, decoder_dim]: encoded visible tokens and mask tokens in patch order, plus positions."""
        latent = self.decoder_embed(self.encode(x, mask))
        if mask is None:
            return latent + self.decoder_pos
        full = self.mask_token.expand(len(x), self.num_patches, -1).clone()
        full[~mask] = latent[:, 1:].reshape(-1, latent.shape[-1])
        return torch.cat([latent[:, :1], full], 1) + self.decoder_pos

    def predict_losses(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ℓ̂ [B, L] from the loss predictor alone (the teacher's query: nothing masked)."""
        return self.loss_predictor_head(self.loss_predictor(self.decoder_tokens(x, mask)))[:, 1:, 0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel predictions [B, L, p²C], predicted losses [B, L]) for every patch position."""
        tokens = self.decoder_tokens(x, mask)
        pixels = self.reconstructor_head(self.reconstructor(tokens))[:, 1:]
        predicted = self.loss_predictor_head(self.loss_predictor(tokens))[:, 1:, 0]
        return pixels, predicted

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Mean of the patch tokens of the unmasked image: the representation the probe reads."""
        was = self.training
        self.eval()
        out = torch.cat([self.encode(x[i : i + batch_size])[:, 1:].mean(1) for i in range(0, len(x), batch_size)])
        self.train(was)
        return out


class StudentTeacher(nn.Module):
    """The trained model and its EMA copy in one module, so one state dict checkpoints both."""

    def __init__(self, student: MaskedAutoencoderViT):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s, 1.0 - decay)


# -- params and training ---------------------------------------------------------------------------


class HPMParams(EmbeddingPlotParams, EpochTrainingParams, ResumableParams):
    """The representation family's shared fields (`RepresentationParams` but its CNN `width`: the encoder
    here is a ViT, sized by `dim` and `depth`) and HPM's own."""

    lr: float = Field(1.5e-3, gt=0.0, le=1.0, description="AdamW peak learning rate (cosine decay)")
    batch_size: int = Field(128, ge=2, le=4096, description="mini-batch size")
    weight_decay: float = Field(0.05, ge=0.0, le=1.0, description="AdamW weight decay")
    epochs: int = Field(15, ge=1, le=1000, description="pre-training epochs")
    checkpoint_every: int = Field(5, ge=0, le=1000, description="checkpoint every N epochs (0: never)")
    masking: Literal["hard-patches", "random"] = Field(
        "hard-patches", description="HPM's easy-to-hard masking, or MAE's uniform random masking (the baseline)"
    )
    loss_predictor: bool = Field(
        True, description="train the loss predictor (L_pred); 'random' masking without it is plain MAE"
    )
    predictor_loss: PredictorLoss = Field("relative", description="relative (pair ranking) or absolute objective")
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches masked")
    hard_max: float = Field(
        0.5, ge=0.0, le=1.0, description="α_max: share of the mask chosen by predicted loss at the last epoch"
    )
    ema_decay: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay of the teacher that picks hard patches")
    image_size: int = Field(16, ge=8, le=128, description="input side (digits are upsampled)")
    patch_size: int = Field(4, ge=1, le=32, description="patch side")
    dim: int = Field(48, ge=8, le=1024, description="encoder width")
    depth: int = Field(3, ge=1, le=24, description="encoder blocks")
    heads: int = Field(4, ge=1, le=16, description="attention heads")
    decoder_dim: int = Field(32, ge=8, le=1024, description="decoder width")
    decoder_depth: int = Field(1, ge=1, le=12, description="blocks of each decoder")
    warmup_epochs: int = Field(2, ge=0, le=100, description="linear learning-rate warm-up")
    crop_strength: float = Field(0.5, ge=0.0, le=1.0, description="strength of the random resized crop (0: none)")


def learning_rate(params: HPMParams, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up then half-cosine decay, per iteration as in MAE's `lr_sched`."""
    t = step / steps_per_epoch
    if t < params.warmup_epochs:
        return params.lr * t / params.warmup_epochs
    progress = (t - params.warmup_epochs) / max(params.epochs - params.warmup_epochs, 1e-9)
    return params.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_model(params: HPMParams) -> StudentTeacher:
    if params.image_size % params.patch_size:
        raise ValueError(f"image_size {params.image_size} is not a multiple of patch_size {params.patch_size}")
    if params.dim % params.heads or params.decoder_dim % params.heads:
        raise ValueError("dim and decoder_dim must be multiples of heads")
    return StudentTeacher(
        MaskedAutoencoderViT(
            params.image_size,
            params.patch_size,
            1,
            params.dim,
            params.depth,
            params.heads,
            params.decoder_dim,
            params.decoder_depth,
        )
    )


def masked_modelling_step(
    model: StudentTeacher, x: torch.Tensor, params: HPMParams, hard_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """(total loss, its parts, the mask) for one batch: the teacher picks the mask, the student learns."""
    length = model.student.num_patches
    if params.masking == "hard-patches":
        with torch.no_grad():
            teacher_guess = model.teacher.predict_losses(x)
    else:
        teacher_guess, hard_fraction = torch.zeros(len(x), length, device=x.device), 0.0
    mask = hard_patch_mask(teacher_guess, params.mask_ratio, hard_fraction, generator)
    pixels, predicted = model.student(x, mask)
    l_rec, per_patch = reconstruction_loss(pixels, patchify(x, params.patch_size), mask)
    parts = {"reconstruction_loss": l_rec.item()}
    loss = l_rec
    if params.loss_predictor:
        objective = relative_prediction_loss if params.predictor_loss == "relative" else absolute_prediction_loss
        l_pred = objective(predicted, per_patch, mask)
        parts["prediction_loss"] = l_pred.item()
        loss = loss + l_pred
    return loss, parts, mask


def train_hpm(ctx: RunContext, params: HPMParams) -> tuple[StudentTeacher, dict, list[dict]]:
    """Pre-train on the dataset's train split; (student and teacher, image splits, per-epoch history)."""
    if ctx.dataset is None:
        raise ValueError("hpm needs an 'image-class' dataset")
    if params.masking == "hard-patches" and not params.loss_predictor:
        raise ValueError("hard-patch masking needs the loss predictor (loss_predictor=true)")
    splits = image_splits(ctx.dataset, params.image_size)
    torch.manual_seed(ctx.seed)
    model = build_model(params).to(ctx.device)
    optimizer = torch.optim.AdamW(
        model.student.parameters(), lr=params.lr, betas=(0.9, 0.95), weight_decay=params.weight_decay
    )
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = resume(ctx, model, optimizer, generator)
    x_all = splits["train"][0]
    recipe = ViewRecipe(ops=("crop",), strength=params.crop_strength)
    steps_per_epoch = math.ceil(len(x_all) / params.batch_size)
    model.train()
    for epoch in range(start, params.epochs):
        alpha = hard_fraction_at(epoch, params.epochs, params.hard_max)
        order = torch.randperm(len(x_all), generator=generator)
        sums: dict[str, float] = {}
        for b, begin in enumerate(range(0, len(x_all), params.batch_size)):
            stop_if_cancelled(ctx)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(params, epoch * steps_per_epoch + b, steps_per_epoch)
            x = random_view(x_all[order[begin : begin + params.batch_size]], recipe, generator).to(ctx.device)
            loss, parts, _ = masked_modelling_step(model, x, params, alpha, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.update_teacher(params.ema_decay)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
        row = {**sums, "hard_fraction": alpha if params.masking == "hard-patches" else 0.0}
        history.append(row)
        ctx.log(epoch + 1, **row)
        if params.checkpoint_every and ((epoch + 1) % params.checkpoint_every == 0 or epoch + 1 == params.epochs):
            ctx.save_checkpoint(training_state(model, optimizer, generator, epoch + 1, history), epoch + 1)
        ctx.progress(epoch + 1, params.epochs, f"epoch {epoch + 1}: reconstruction {row['reconstruction_loss']:.4f}")
    return model, splits, history


@torch.no_grad()
def mask_panel(model: StudentTeacher, x: torch.Tensor, params: HPMParams, hard_fraction: float, seed: int) -> bytes:
    """PNG rows: the images, the masked input, the reconstruction (visible patches pasted back)."""
    model.eval()
    _, _, mask = masked_modelling_step(model, x, params, hard_fraction, torch.Generator().manual_seed(seed))
    pixels, _ = model.student(x, mask)
    model.train()
    patches = patchify(x, params.patch_size)
    shown = unpatchify(patches.masked_fill(mask[..., None], 0.5), params.patch_size, 1)
    rebuilt = unpatchify(torch.where(mask[..., None], pixels, patches), params.patch_size, 1)
    return image_grid(torch.cat([x, shown, rebuilt]).clamp(0, 1), nrow=len(x), scale=3)


@method(
    "hpm",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=HPMParams,
    paper="Bootstrap Masked Visual Modeling via Hard Patches Mining",
    tiny={
        "epochs": 2,
        "image_size": 8,
        "patch_size": 2,
        "dim": 16,
        "depth": 1,
        "heads": 2,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "batch_size": 512,
        "plot": "none",
    },
)
def run(ctx: RunContext, params: HPMParams) -> None:
    """Masked-image pre-training of a small ViT (HPM or MAE masking); the shared evaluation on its features."""
    model, splits, history = train_hpm(ctx, params)
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    finish_representation_job(
        ctx,
        params,
        method="hpm",
        step=params.epochs,
        train=(model.student.features(x_tr), y_tr.numpy()),
        test=(model.student.features(x_te), y_te.numpy()),
        history=history,
        curves=("reconstruction_loss", "prediction_loss", "hard_fraction"),
        label=params.masking,
    )
    last_alpha = history[-1]["hard_fraction"]
    ctx.save_artifact("masks.png", mask_panel(model, x_te[:8], params, last_alpha, ctx.seed), kind="image")


# -- reproduction -------------------------------------------------------------------------------

ARMS = {
    "hpm": {"masking": "hard-patches", "loss_predictor": True},
    "mae": {"masking": "random", "loss_predictor": False},
    "mae+pred": {"masking": "random", "loss_predictor": True},
}


@reproduction(
    "hpm",
    claim="after the same pre-training budget, HPM's encoder beats MAE's by ≥ 1 linear-probe point "
    "on digits, and the loss predictor alone (random masking) does not hurt MAE",
    metric="linear-probe accuracy (test, mean over seeds)",
    direction="higher",
    baseline="MAE: uniform random masking, no loss predictor",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    arms = ("hpm", "mae") if smoke else tuple(ARMS)
    budget = {"epochs": 1, "dim": 32, "depth": 1, "decoder_dim": 32, "decoder_depth": 1} if smoke else {}
    acc: dict[str, list[float]] = {a: [] for a in arms}
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        for arm in arms:
            params = HPMParams(**ARMS[arm], checkpoint_every=0, **budget)
            model, splits, _ = train_hpm(InMemoryRunContext(dataset=ds, seed=s), params)
            (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
            acc[arm].append(
                linear_probe_accuracy(
                    model.student.features(x_tr).numpy(),
                    y_tr.numpy(),
                    model.student.features(x_te).numpy(),
                    y_te.numpy(),
                )
            )
    mean = {a: float(np.mean(v)) for a, v in acc.items()}
    ours, base = mean["hpm"], mean["mae"]
    # the claim's margin is judged by the harness over seeds; this is the note's reading of the means
    holds = ours >= base + 0.01 and mean.get("mae+pred", base) >= base
    note = (
        f"probe HPM {ours:.3f}, MAE {base:.3f}"
        + (f", MAE + loss predictor {mean['mae+pred']:.3f}" if "mae+pred" in mean else "")
        + f" over {len(seeds)} seed(s); per seed "
        + "; ".join(f"{a} {np.round(v, 3).tolist()}" for a, v in acc.items())
    )
    if not holds and not smoke:
        gap, spread = ours - base, float(np.std(np.array(acc["hpm"]) - np.array(acc["mae"])))
        if spread >= abs(gap):
            note += (
                f"; the HPM − MAE gap {gap:+.3f} is within its seed-to-seed spread ±{spread:.3f}: with 16 "
                "patches per 16×16 digit and ~130 AdamW steps, which patches are masked moves the probe less "
                "than the seed does"
            )
        else:
            note += (
                f"; the HPM − MAE gap {gap:+.3f} (spread ±{spread:.3f}) falls short of the 1-point bar at this scale"
            )
        note += " (the paper measures after 200–1,600 ImageNet epochs with 196 patches per image)"
    checks = (
        # "the loss predictor alone does not hurt MAE": no worse than MAE by more than the noise
        (Comparison("MAE + loss predictor no worse than MAE", acc["mae+pred"], acc["mae"], "higher"),)
        if "mae+pred" in acc
        else ()
    )
    return Outcome(ours=acc["hpm"], baseline=acc["mae"], margin=0.01, checks=checks, note=note, details={"probe": acc})
