"""BD-KD: balancing forward and reverse KL in online distillation.

Paper: Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD: Balancing the Divergences for Online Knowledge
Distillation", arXiv 2212.12965. No public reference code was found; deep mutual learning (the
baseline) is written here too.

Online KD trains a large teacher and a compact student together. Deep mutual learning (DML, Zhang,
Xiang, Hospedales & Lu, CVPR 2018) gives each network cross-entropy plus the forward KL to its
(detached) partner:

    L_S = CE(p_s, y) + KL(p_t ‖ p_s),      L_T = CE(p_t, y) + KL(p_s ‖ p_t).

BD-KD (the abstract: "adaptively balancing between the reverse and forward divergences shifts the
focus of the training strategy to the compact student network") makes training student-centred: the
student's distillation term mixes forward KL (mass-covering, it spreads the student's probability)
and reverse KL (mode-seeking, it sharpens it) with per-sample weights, and the teacher's term
becomes a reverse-KL regulariser:

    L_S = CE(p_s, y) + (1/B) Σ_i [w_f,i·KL(p_t,i ‖ p_s,i) + w_r,i·KL(p_s,i ‖ p_t,i)],
    L_T = CE(p_t, y) + KL(p_t ‖ p_s)        (gradient to the teacher only).

Both losses are summed and one optimiser steps both networks (each network's partner is detached).

What is the paper's and what is our reading: only the abstract and third-party summaries of the
paper could be read, which say the per-sample weights follow the teacher–student entropy gap; the
exact rule and its constants are this module's reading and stay configurable. `balance="entropy"`
(default): a student more uncertain than the teacher on sample i (H(p_s,i) > H(p_t,i)) gets reverse
KL (sharpen), one more confident than the teacher gets forward KL (soften) — w_r,i = ω·𝟙[H_s > H_t],
w_f,i = 𝟙[H_s ≤ H_t]; `balance="fixed"` uses constant weights (w_f, w_r) = (1, ω). With ω = 0
under "fixed" and the forward teacher term the loss is exactly DML (a unit test pins this), which is
how `variant="dml"` runs.

Defaults: ω = 1; the student is the family's 64-wide, 2-layer MLP (or the Conv-4 CNN on images), the
teacher a 512-wide, 2-layer MLP, both trained 30 epochs by SGD (lr 0.05, momentum 0.9, weight decay
5e-4, ÷10 at 50% and 75%): a small-scale stand-in for the paper's CIFAR ResNet/MobileNet pairs, not
the paper's schedule.
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
from models.datasets import load_builtin
from models.metrics import classification_metrics
from models.nn.backbones import build_backbone
from models.nn.losses import BatchLoss
from models.registry import method
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep
from models.training import (
    ClassificationData,
    ClassifierTrainingParams,
    HelperRunContext,
    TrainedClassifier,
    fit_calibrated,
    predict_logits,
    save_training_plots,
)

Balance = Literal["entropy", "fixed"]


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(dim=1)


def divergence_weights(
    log_ps: torch.Tensor, log_pt: torch.Tensor, balance: Balance, omega: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_f, w_r) per sample: by the entropy gap (see the module docstring) or constant (1, ω)."""
    if balance == "fixed":
        ones = torch.ones(len(log_ps), device=log_ps.device)
        return ones, omega * ones
    uncertain = (entropy(log_ps) > entropy(log_pt)).float()
    return 1.0 - uncertain, omega * uncertain


class OnlinePair(nn.Module):
    """Teacher and student trained together; `forward` is the student (what is evaluated and deployed)."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


class BalancedDivergence(BatchLoss):
    """L_S + L_T of BD-KD (or DML), each network's partner detached, so one optimiser trains both."""

    needs = frozenset({"online_teacher"})

    def __init__(
        self, balance: Balance = "entropy", omega: float = 1.0, teacher_term: Literal["reverse", "forward"] = "reverse"
    ):
        super().__init__()
        self.balance, self.omega, self.teacher_term = balance, omega, teacher_term

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        zs, zt = model.student(x), model.teacher(x)
        log_ps, log_pt = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
        w_f, w_r = divergence_weights(log_ps.detach(), log_pt.detach(), self.balance, self.omega)
        student = (
            F.cross_entropy(zs, target) + (w_f * kl(log_pt.detach(), log_ps) + w_r * kl(log_ps, log_pt.detach())).mean()
        )
        if self.teacher_term == "reverse":
            teacher_div = kl(log_pt, log_ps.detach())
        else:  # DML: the teacher matches the student's distribution, KL(p_s ‖ p_t)
            teacher_div = kl(log_ps.detach(), log_pt)
        return student + F.cross_entropy(zt, target) + teacher_div.mean()


class BDKDParams(ClassifierTrainingParams):
    variant: Literal["bd-kd", "dml"] = Field(
        "bd-kd", description="bd-kd: balanced divergences; dml: deep mutual learning (the online-KD baseline)"
    )
    balance: Balance = Field("entropy", description="per-sample weights from the entropy gap, or fixed (1, ω)")
    omega: float = Field(1.0, ge=0.0, le=100.0, description="weight ω of the reverse KL")
    hidden: int = Field(64, ge=8, le=4096, description="student MLP width, or CNN channels")
    teacher_hidden: int = Field(512, ge=8, le=8192, description="teacher MLP width")


@dataclass
class BDKDResult:
    test: dict[str, float]
    teacher_test: dict[str, float]
    trained: TrainedClassifier


def train_bd_kd(ctx: RunContext, params: BDKDParams) -> BDKDResult:
    def pair(data: ClassificationData) -> nn.Module:
        teacher = build_backbone("mlp", data.input_shape, data.num_classes, params.teacher_hidden, 2)
        return OnlinePair(teacher, params.backbone_for(data))

    def loss(data: ClassificationData) -> nn.Module:
        if params.variant == "dml":
            return BalancedDivergence("fixed", 0.0, "forward")
        return BalancedDivergence(params.balance, params.omega, "reverse")

    trained = fit_calibrated(ctx, params, loss, "bd-kd", make_model=pair)
    data = trained.data
    test = classification_metrics(predict_logits(trained.model, data.x_test), data.y_test)
    teacher_test = classification_metrics(predict_logits(trained.model.teacher, data.x_test), data.y_test)
    ctx.log(
        params.epochs,
        **{f"test_{k}": v for k, v in test.items()},
        **{f"teacher_test_{k}": v for k, v in teacher_test.items()},
    )
    return BDKDResult(test, teacher_test, trained)


@method(
    "bd-kd",
    family="classification",
    task="train",
    datasets=("image-class", "tabular"),
    params=BDKDParams,
    paper="BD-KD: Balancing the Divergences for Online Knowledge Distillation",
    tiny={"epochs": 3, "hidden": 16, "teacher_hidden": 32, "batch_size": 128},
)
def run(ctx: RunContext, params: BDKDParams) -> None:
    """Train a teacher and a compact student together (BD-KD or DML); report the student's accuracy, ECE
    and NLL (and the teacher's), learning curves and the student's reliability diagram."""
    result = train_bd_kd(ctx, params)
    save_training_plots(ctx, params.variant, result.trained)


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "bd-kd",
    claim="the BD-KD student's test ECE is at least 30% lower than the DML student's at no lower "
    "accuracy (within half a point; digits, MLP 512×2 teacher and 64×2 student trained together; the entropy-gap "
    "weighting is our reading of the paper)",
    metric="student test ECE (15 bins)",
    direction="lower",
    baseline="DML",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per seed, a BD-KD pair and a DML pair with the same initialisation and schedule; the students' test
    ECE paired by seed, judged against the claim's 30% margin, and their accuracy (BD-KD within half a
    point of DML or better), both by the harness's noise rule over seeds."""
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    budget = {"epochs": 2} if smoke else {}
    scores: dict[str, list[dict[str, float]]] = {"bd-kd": [], "dml": []}
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        for variant in scores:
            params = BDKDParams(variant=variant, checkpoint_every=0, **budget)
            scores[variant].append(train_bd_kd(HelperRunContext(ctx, s, ds), params).test)
    mean = {v: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for v, rows in scores.items()}
    ours, base = mean["bd-kd"], mean["dml"]
    note = (
        f"BD-KD student: ECE {ours['ece']:.4f}, acc {ours['acc']:.4f}, NLL {ours['nll']:.3f}; DML student: ECE "
        f"{base['ece']:.4f}, acc {base['acc']:.4f}, NLL {base['nll']:.3f} (means over {len(seeds)} seed(s)); the "
        "entropy-gap weighting is this module's reading of the paper (its exact rule could not be retrieved)"
    )
    return Outcome(
        ours=[r["ece"] for r in scores["bd-kd"]],
        baseline=[r["ece"] for r in scores["dml"]],
        margin=0.3,  # "at least 30% lower": each seed's ECE gain beyond 30% of DML's ECE
        relative=True,
        checks=(
            Comparison(
                "student accuracy no lower than DML's (within half a point)",
                [r["acc"] for r in scores["bd-kd"]],
                [r["acc"] for r in scores["dml"]],
                "higher",
                margin=-0.005,
            ),
        ),
        note=note,
        details={"test": mean, "per_seed": scores},
    )
