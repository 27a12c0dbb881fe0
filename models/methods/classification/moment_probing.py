"""Moment probing: a head on frozen transformer tokens that reads their first and second moments.

Paper: Mingze Gao, Qilong Wang, Zhenyi Lin, Pengfei Zhu, Qinghua Hu & Jingbo Zhou, "Tuning Pre-trained
Model via Moment Probing", ICCV 2023 (arXiv 2307.11342). Reference code:
https://github.com/mingzeG/Moment-Probing.

Linear probing (LP) classifies the frozen [CLS] token, a first-order statistic of the final features.
Moment probing (MP) approximates the characteristic function of the token distribution by its first
two moments and averages two linear classifiers (paper eq. 3–6):

    logits = ½(W₁ t_cls + b₁) + ½(W₂ vec(MHC³(X)) + b₂),

where MHC³, the multi-head convolutional cross-covariance, keeps the second moment tractable: the
patch tokens X ∈ R^{L×D} (no [CLS]) are projected to `hidden` = 512 and split into H = 4 heads of
d = 128; each head is layer-normalised (one LayerNorm shared by the heads) and the cross-covariances of
adjacent heads Σ_i = (1/L) Z̄_iᵀ Z̄_{i+1} (Z̄ centred over tokens) give H − 1 maps of d×d, each
L2-normalised along its first axis; two stride-2 3×3 convolutions (GELU between, no bias, H − 1
channels) shrink them to (H − 1)·31·31 = 2883 features for d = 128, and W₂ classifies those. Σ is a
sum over tokens, so the second-order branch ignores the order of the patch tokens; centring makes Σ
ignore any vector added to every token; with the branch removed, MP is exactly LP.

Checked against the reference code (`models/representation/MP.py`, `Moment_Probing_ViT` with
`cross_type='near'`): projection, head split, shared LayerNorm, adjacent-head pairs, normalisation
axis, the convolution stack and the ½ + ½ average are as there. One deliberate difference: the
released `Covariance._remove_mean` subtracts one scalar per sample (an `adaptive_avg_pool2d` over both
the token and channel axes of a 3-D tensor), which after a LayerNorm is nearly a no-op; here each
channel is centred over the tokens, the covariance the paper writes. MP⁺ (PSRP, recalibrating the
frozen backbone) is not implemented.

The paper probes ViT-B/16 pre-trained on ImageNet-21k (AdamW, lr 1e-4, weight decay 0.05, 100
epochs with 10 of warm-up). Crucible trains its own backbone instead: a tiny ViT (`models.nn.vit`,
patch 2 on 8×8 digits, 16 patch tokens of width 64, 4 blocks) pre-trained with labels on digits 0–4
(AdamW 1e-3, weight decay 0.05, 30 epochs), frozen, and probed on the unseen classes 5–9 with K
labelled images per class. Probe defaults (ours, for so small a problem): with D = 64 the head uses
hidden = 256 (4 heads of 64 → 3·15·15 = 675 features); AdamW with the paper's weight decay 0.05 but
lr 1e-3, batch 16, 60 epochs, ÷10 at 50% and 75%, no warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.context import RunContext
from models.datasets import Dataset, load_builtin
from models.metrics import classification_metrics, reliability_bins
from models.nn.losses import CrossEntropy
from models.nn.vit import TinyViT
from models.optim import OptimizerName
from models.params import EpochTrainingParams, ResumableParams
from models.plots import curves_figure, reliability_figure
from models.registry import MethodParams, method
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep
from models.training import (
    ClassificationData,
    HelperRunContext,
    SGDSchedule,
    TrainedClassifier,
    fit_classifier,
    predict_logits,
    save_training_plots,
)

FirstOrder = Literal["cls", "mean"]


def cross_covariance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ = (1/L) āᵀ b̄ for token sets a, b [B, L, d] centred per channel over the L tokens → [B, d, d]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return a.transpose(1, 2) @ b / a.shape[1]


def downsampled_side(d: int) -> int:
    """Side of a d×d map after the two unpadded stride-2 3×3 convolutions."""
    for _ in range(2):
        d = (d - 3) // 2 + 1
    return d


class MomentProbe(nn.Module):
    """MP head on frozen tokens [B, 1 + L, D] ([CLS] first); `second_order=False` is the linear probe."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        hidden: int = 256,
        heads: int = 4,
        first_order: FirstOrder = "cls",
        second_order: bool = True,
    ):
        super().__init__()
        if hidden % heads or heads < 2:
            raise ValueError(f"hidden {hidden} must split into ≥ 2 heads of equal width, got {heads} heads")
        if downsampled_side(hidden // heads) < 1:
            raise ValueError(f"head width {hidden // heads} is too small for two stride-2 3×3 convolutions (≥ 7)")
        self.first_order, self.second_order, self.heads = first_order, second_order, heads
        self.classifier1 = nn.Linear(dim, num_classes)
        if second_order:
            pairs, side = heads - 1, downsampled_side(hidden // heads)
            self.proj = nn.Linear(dim, hidden)
            self.ln = nn.LayerNorm(hidden // heads)
            self.down = nn.Sequential(
                nn.Conv2d(pairs, pairs, 3, stride=2, bias=False),
                nn.GELU(),
                nn.Conv2d(pairs, pairs, 3, stride=2, bias=False),
            )
            self.classifier2 = nn.Linear(pairs * side * side, num_classes)

    @property
    def second_order_dim(self) -> int:
        return self.classifier2.in_features if self.second_order else 0

    def first_moment(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.first_order == "cls" else tokens[:, 1:].mean(dim=1)

    def covariance_maps(self, tokens: torch.Tensor) -> torch.Tensor:
        """MHC³ before the convolutions: [B, H − 1, d, d] normalised cross-covariances of adjacent heads."""
        z = self.proj(tokens[:, 1:])
        heads = self.ln(z.reshape(*z.shape[:2], self.heads, -1)).unbind(dim=2)
        maps = [F.normalize(cross_covariance(heads[i], heads[i + 1]), dim=1) for i in range(self.heads - 1)]
        return torch.stack(maps, dim=1)

    def second_moment(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(self.covariance_maps(tokens)).flatten(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        linear = self.classifier1(self.first_moment(tokens))
        if not self.second_order:
            return linear
        return (linear + self.classifier2(self.second_moment(tokens))) / 2


# -- data and the frozen backbone -----------------------------------------------------------------------


@dataclass
class ClassPools:
    """Images and labels of the base classes (pre-training) and of the novel ones (probing), per split."""

    base: dict[str, tuple[torch.Tensor, torch.Tensor]]
    novel: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_base: int
    num_novel: int


def class_pools(ds: Dataset, novel_classes: int) -> ClassPools:
    """The last `novel_classes` classes are novel (labels renumbered from 0), the rest are base."""
    if ds.kind != "image-class":
        raise ValueError("moment-probing needs an 'image-class' dataset")
    num_classes = int(ds.meta.get("num_classes") or 1 + max(int(np.max(ds.splits[s]["y"])) for s in ds.splits))
    n_base = num_classes - novel_classes
    if n_base < 2:
        raise ValueError(f"pre-training needs ≥ 2 base classes, {num_classes} classes leave {n_base}")
    base, novel = {}, {}
    for split in ("train", "val", "test"):
        x = torch.from_numpy(np.asarray(ds.splits[split]["x"], dtype=np.float32))
        y = torch.from_numpy(np.asarray(ds.splits[split]["y"], dtype=np.int64))
        base[split] = (x[y < n_base], y[y < n_base])
        novel[split] = (x[y >= n_base], y[y >= n_base] - n_base)
    return ClassPools(base, novel, n_base, novel_classes)


def sample_shots(y: torch.Tensor, shots: int | None, seed: int) -> torch.Tensor:
    """Indices of `shots` random examples per class (all when None)."""
    if shots is None:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(picks)


class BackboneParams(MethodParams):
    """The tiny ViT pre-trained with labels on the base classes, then frozen."""

    vit_dim: int = Field(64, ge=8, le=1024, description="ViT width D")
    vit_depth: int = Field(4, ge=1, le=24, description="ViT blocks")
    vit_heads: int = Field(4, ge=1, le=16, description="ViT attention heads")
    patch: int = Field(2, ge=1, le=8, description="ViT patch size (pixels)")
    pretrain_epochs: int = Field(30, ge=1, le=1000, description="supervised pre-training epochs on the base classes")


def pretrain_backbone(
    pools: ClassPools, params: BackboneParams, seed: int, device: str = "cpu", parent: RunContext | None = None
) -> TinyViT:
    """Supervised pre-training of the tiny ViT on the base classes (AdamW 1e-3, wd 0.05); frozen on return.

    Runs in a private in-memory context that stops (`Cancelled`) when `parent`, the job, is cancelled: it is
    deterministic given the seed, so a resumed probing job rebuilds the same backbone instead of
    checkpointing it."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (pools.base[s] for s in ("train", "val", "test"))
    data = ClassificationData(x_tr, y_tr, x_va, y_va, x_te, y_te, pools.num_base).to(device)
    torch.manual_seed(seed)
    vit = TinyViT(
        x_tr.shape[1], x_tr.shape[-1], pools.num_base, params.patch, params.vit_dim, params.vit_depth, params.vit_heads
    ).to(device)
    schedule = SGDSchedule(params.pretrain_epochs, 64, 1e-3, weight_decay=0.05, optimizer_name="adamw")
    fit_classifier(HelperRunContext(parent, seed), vit, CrossEntropy(), data, schedule)
    vit.eval().requires_grad_(False)
    return vit


@torch.no_grad()
def frozen_tokens(vit: TinyViT, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([vit.tokens(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


# -- the method ----------------------------------------------------------------------------------------


class MomentProbingParams(BackboneParams, EpochTrainingParams, ResumableParams):
    probe: Literal["mp", "lp"] = Field("mp", description="moment probing, or the linear probe on the first moment")
    novel_classes: int = Field(5, ge=2, le=1000, description="the last N classes are unseen in pre-training and probed")
    shots: int | None = Field(10, ge=1, le=100_000, description="labelled probe images per novel class (None: all)")
    hidden: int = Field(256, ge=16, le=4096, description="MHC³ projection width (paper: 512 for D = 768)")
    heads: int = Field(4, ge=2, le=64, description="MHC³ heads; adjacent pairs give heads − 1 covariance maps")
    first_order: FirstOrder = Field("cls", description="first moment: the [CLS] token (ViT, paper) or the mean token")
    epochs: int = Field(60, ge=1, le=10_000, description="probe epochs; the learning rate drops ÷10 at 50% and 75%")
    batch_size: int = Field(16, ge=1, le=8192, description="probe mini-batch size")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="probe learning rate")
    weight_decay: float = Field(0.05, ge=0.0, le=1.0, description="probe weight decay (paper: 0.05)")
    optimizer: OptimizerName = Field("adamw", description="probe optimizer (paper: AdamW)")
    checkpoint_every: int = Field(25, ge=0, le=10_000, description="save a probe checkpoint every N epochs (0: never)")

    def schedule(self) -> SGDSchedule:
        return SGDSchedule(
            self.epochs,
            self.batch_size,
            self.lr,
            weight_decay=self.weight_decay,
            checkpoint_every=self.checkpoint_every,
            optimizer_name=self.optimizer,
        )


@dataclass
class ProbeResult:
    test: dict[str, float]  # acc, ece, mce, nll on the novel classes' test split
    trained: TrainedClassifier


def train_probe(ctx: RunContext, params: MomentProbingParams, vit: TinyViT, pools: ClassPools) -> ProbeResult:
    """Fit the probe on frozen tokens of K shots per novel class; score the novel test split."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (pools.novel[s] for s in ("train", "val", "test"))
    chosen = sample_shots(y_tr, params.shots, ctx.seed)
    tokens = {
        s: frozen_tokens(vit, x.to(ctx.device)) for s, x in (("train", x_tr[chosen]), ("val", x_va), ("test", x_te))
    }
    data = ClassificationData(
        tokens["train"],
        y_tr[chosen].to(ctx.device),
        tokens["val"],
        y_va.to(ctx.device),
        tokens["test"],
        y_te.to(ctx.device),
        pools.num_novel,
    )
    torch.manual_seed(ctx.seed)
    head = MomentProbe(
        vit.dim, pools.num_novel, params.hidden, params.heads, params.first_order, second_order=params.probe == "mp"
    ).to(ctx.device)

    def val_calibration() -> dict[str, float]:
        m = classification_metrics(predict_logits(head, data.x_val), data.y_val)
        return {"val_ece": m["ece"], "val_nll": m["nll"]}

    history = fit_classifier(ctx, head, CrossEntropy(), data, params.schedule(), val_calibration)
    test = classification_metrics(predict_logits(head, data.x_test), data.y_test)
    ctx.log(params.epochs, **{f"test_{k}": v for k, v in test.items()})
    return ProbeResult(test, TrainedClassifier(head, data, history))


@method(
    "moment-probing",
    family="classification",
    task="train",
    datasets=("image-class",),
    params=MomentProbingParams,
    paper="Tuning Pre-trained Model via Moment Probing",
    tiny={
        "pretrain_epochs": 1,
        "vit_dim": 16,
        "vit_depth": 1,
        "vit_heads": 2,
        "hidden": 32,
        "heads": 2,
        "shots": 5,
        "epochs": 3,
    },
)
def run(ctx: RunContext, params: MomentProbingParams) -> None:
    """Pre-train a tiny ViT on the base classes, freeze it, probe the novel classes with MP or LP from K shots;
    test accuracy, ECE/MCE and NLL, learning curves and a reliability diagram."""
    if ctx.dataset is None:
        raise ValueError("moment-probing needs an 'image-class' dataset")
    pools = class_pools(ctx.dataset, params.novel_classes)
    ctx.progress(0, params.epochs, "pre-training the backbone on the base classes")
    vit = pretrain_backbone(pools, params, ctx.seed, ctx.device, parent=ctx)
    result = train_probe(ctx, params, vit, pools)
    save_training_plots(ctx, params.probe, result.trained)


# -- reproduction ---------------------------------------------------------------------------------------

SHOTS = (5, 10, 20)


@reproduction(
    "moment-probing",
    claim="on a frozen ViT pre-trained on digits 0–4, moment probing beats linear probing "
    "on the unseen digits 5–9 by ≥ 2 points at 5, 10 and 20 shots per class",
    metric="test accuracy on novel classes (mean over shots and seeds)",
    direction="higher",
    baseline="linear probing ([CLS])",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """One backbone per seed; per K, both probes see the same K shots and the same schedule; accuracy and
    calibration on the novel test split. MP's and LP's accuracy, averaged over the shots, are paired by seed
    (backbone and shots both vary with it); a gain of ≥ 2 points at every K (means over seeds) is the
    claim's further condition."""
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    shots = (5,) if smoke else SHOTS
    budget = {"pretrain_epochs": 1, "epochs": 2, "vit_depth": 1} if smoke else {}
    pools = class_pools(ds, 5)
    # "lp-mean" is an ablation, not the baseline: a linear probe on the mean patch token, which asks whether
    # MP's gain is only from reading the patch tokens rather than from their second moment
    arms = {"lp": {"probe": "lp"}, "mp": {"probe": "mp"}, "lp-mean": {"probe": "lp", "first_order": "mean"}}
    scores: dict[str, dict[int, list[dict[str, float]]]] = {arm: {} for arm in arms}
    diagrams, base_acc = {}, []
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        vit = pretrain_backbone(pools, MomentProbingParams(**budget), s, parent=ctx)
        x_base, y_base = pools.base["test"]
        base_acc.append((predict_logits(vit, x_base).argmax(1) == y_base).float().mean().item())
        for k in shots:
            for arm, choice in arms.items():
                params = MomentProbingParams(shots=k, checkpoint_every=0, **choice, **budget)
                result = train_probe(HelperRunContext(ctx, s), params, vit, pools)
                scores[arm].setdefault(k, []).append(result.test)
                if s == seed and k == shots[0] and arm != "lp-mean":
                    t = result.trained
                    diagrams[f"{arm.upper()}, {k}-shot"] = reliability_bins(
                        predict_logits(t.model, t.data.x_test), t.data.y_test
                    )
    mean = {
        p: {k: {m: float(np.mean([r[m] for r in rows])) for m in rows[0]} for k, rows in by_k.items()}
        for p, by_k in scores.items()
    }
    ctx.save_artifact("moment_probing_reliability.png", reliability_figure(diagrams), kind="plot")
    series = {p.upper(): (list(shots), [mean[p][k]["acc"] for k in shots]) for p in mean}
    ctx.save_artifact(
        "moment_probing_accuracy.png", curves_figure({"novel-class test accuracy": series}, "shots K"), kind="plot"
    )
    gains = {k: mean["mp"][k]["acc"] - mean["lp"][k]["acc"] for k in shots}

    def over_shots(arm: str) -> list[float]:  # per seed, the accuracy averaged over the shots
        return [float(np.mean([scores[arm][k][i]["acc"] for k in shots])) for i in range(len(seeds))]

    note = "; ".join(
        f"{k}-shot: MP {mean['mp'][k]['acc']:.3f} (ECE {mean['mp'][k]['ece']:.3f}) vs LP "
        f"{mean['lp'][k]['acc']:.3f} (ECE {mean['lp'][k]['ece']:.3f})"
        for k in shots
    )
    note += "; ablation LP on the mean patch token: " + ", ".join(
        f"{k}-shot {mean['lp-mean'][k]['acc']:.3f}" for k in shots
    )
    note += f"; backbone base-class test acc {np.mean(base_acc):.3f}; means over {len(seeds)} seed(s)"
    return Outcome(
        ours=over_shots("mp"),
        baseline=over_shots("lp"),
        checks=tuple(  # "by at least 2 points at each K", each judged over seeds
            Comparison(
                f"{k}-shot accuracy, by at least 2 points",
                [scores["mp"][k][i]["acc"] for i in range(len(seeds))],
                [scores["lp"][k][i]["acc"] for i in range(len(seeds))],
                "higher",
                margin=0.02,
            )
            for k in shots
        ),
        note=note,
        details={
            "mean": {p: {str(k): v for k, v in by_k.items()} for p, by_k in mean.items()},
            "gain_per_shot": {str(k): g for k, g in gains.items()},
            "backbone_base_test_acc": base_acc,
        },
    )
