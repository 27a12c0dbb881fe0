"""Comp-sum losses and smooth adversarial comp-sum losses.

Paper: Anqi Mao, Mehryar Mohri & Yutao Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and
Applications", ICML 2023 (arXiv 2304.07288). No public reference code was found; PGD, TRADES and
PGD adversarial training are written here (`models.adversarial`).

A comp-sum loss composes a function Φ with the sum of exponentiated logit gaps,

    u(z, y) = Σ_{y'≠y} exp(z_{y'} − z_y) = 1/p_y − 1,          L_τ(z, y) = Φ^τ(u),

    Φ^τ(u) = log(1 + u)                         (τ = 1: cross-entropy / logistic loss)
    Φ^τ(u) = ((1 + u)^{1−τ} − 1)/(1 − τ)       (τ ≠ 1),

so that L_τ = (1 − p_y^{τ−1})/(τ − 1): τ = 0 is the sum-exponential loss (1 − p_y)/p_y, τ ∈ (1, 2)
generalised cross-entropy with q = τ − 1, τ = 2 the mean absolute error 1 − p_y (half of
‖e_y − p‖₁). The paper proves H-consistency bounds for the whole family,

    E_{0-1}(h) − E*_{0-1}(H) + M_{0-1}(H) ≤ Γ_τ(E_{L_τ}(h) − E*_{L_τ}(H) + M_{L_τ}(H)),

with minimizability gaps M; Γ_τ is tighter for larger τ but the gaps grow with τ, which is why τ
near 1 does best in practice and τ = 2 underfits as the number of classes grows (the exact Γ_τ
could not be checked and plays no part in the code).

Smooth adversarial comp-sum losses add a smooth, label-free term measuring how far the score
vector moves inside the ℓ∞ ball of radius γ:

    L̃_τ(h, x, y) = L_τ(h(x), y) + ν · sup_{‖x'−x‖_∞ ≤ γ} ‖h(x') − h(x)‖₂,

minimised with weight decay (the "regularized smooth adversarial comp-sum loss" of the abstract),
the inner sup taken by PGD from x + 0.001·N(0, 1). What is the paper's and what is our reading:
the abstract names the loss family and the algorithm; the exact form of the smooth term and the ν
the paper used could not be checked (only the abstract could be read). This module implements the
reading above: the TRADES template (Zhang et al., ICML 2019: CE + β·KL(p(x) ‖ p(x'))) with the KL
between probabilities replaced by the ℓ2 distance between score vectors, the form whose ν = 0 case
is plainly L_τ. The baselines are PGD adversarial training (Madry et al., ICLR 2018: CE at the PGD
point) and TRADES.

Defaults: τ = 1 (cross-entropy); ν = 0.3, our choice (with the unsquared logit distance, ν ≥ 3
collapses a digits MLP to constant logits); TRADES β = 6 (its paper); γ = 0.1 on [0, 1] images,
PGD-10 with step 2.5γ/10 inside training and PGD-20 for robust accuracy (the usual Madry/TRADES
settings scaled to digits); the family's SGD schedule (lr 0.05, momentum 0.9, weight decay 5e-4,
30 epochs, ÷10 at 50% and 75%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.adversarial import pgd_cross_entropy, pgd_linf, robust_accuracy
from models.context import RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.metrics import classification_metrics
from models.nn.losses import BatchLoss
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep
from models.training import (
    ClassifierTrainingParams,
    HelperRunContext,
    TrainedClassifier,
    fit_calibrated,
    predict_logits,
    save_training_plots,
)

LossName = Literal["comp-sum", "smooth-adv-comp-sum", "trades", "pgd-at"]


def comp_sum_loss(logits: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-example L_τ = (1 − p_y^{τ−1})/(τ − 1), and −log p_y at τ = 1, from log p_y (stable for any logits)."""
    log_p_y = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    if tau == 1.0:
        return -log_p_y
    a = tau - 1.0
    return -torch.expm1(a * log_p_y) / a  # (1 − exp(a·log p_y))/a, accurate as τ → 1


class CompSum(nn.Module):
    """The comp-sum loss L_τ averaged over the batch."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = tau

    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.tau == 1.0:
            return F.cross_entropy(logits, target)
        return comp_sum_loss(logits, target, self.tau).mean()


@dataclass(frozen=True)
class Attack:
    """The inner maximisation's PGD: ℓ∞ radius γ, step size, number of steps (inputs clipped to [0, 1] if set)."""

    eps: float = 0.1
    step_size: float = 0.025
    steps: int = 10
    clip: tuple[float, float] | None = (0.0, 1.0)


class SmoothAdvCompSum(BatchLoss):
    """L_τ(h(x), y) + ν·sup_{‖x'−x‖∞≤γ} ‖h(x') − h(x)‖₂, the sup by PGD from x + 0.001·N(0, 1)."""

    needs = frozenset({"adversarial"})

    def __init__(self, tau: float = 1.0, nu: float = 1.0, attack: Attack = Attack()):
        super().__init__()
        self.comp_sum, self.nu, self.attack = CompSum(tau), nu, attack

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = model(x)
        if self.nu == 0.0:
            return self.comp_sum(logits, target)
        with torch.no_grad():
            anchor = predict_logits(model, x)  # the attack's reference, computed in eval mode like the attack
        a = self.attack
        x_adv = pgd_linf(
            model,
            x,
            lambda xa: (model(xa) - anchor).norm(dim=1),
            a.eps,
            a.step_size,
            a.steps,
            random_start=1e-3,
            clip=a.clip,
        )
        smooth = (model(x_adv) - logits).norm(dim=1).mean()
        return self.comp_sum(logits, target) + self.nu * smooth


class TRADES(BatchLoss):
    """TRADES (Zhang et al. 2019): CE(h(x), y) + β·KL(p(x) ‖ p(x')), x' maximising that KL by PGD."""

    needs = frozenset({"adversarial"})

    def __init__(self, beta: float = 6.0, attack: Attack = Attack()):
        super().__init__()
        self.beta, self.attack = beta, attack

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            p_clean = F.softmax(predict_logits(model, x), dim=1)
        a = self.attack
        x_adv = pgd_linf(
            model, x, lambda xa: _kl(p_clean, model(xa)), a.eps, a.step_size, a.steps, random_start=1e-3, clip=a.clip
        )
        logits = model(x)
        return F.cross_entropy(logits, target) + self.beta * _kl(F.softmax(logits, dim=1), model(x_adv)).mean()


def _kl(p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits_q)) per example."""
    return F.kl_div(F.log_softmax(logits_q, dim=1), p, reduction="none").sum(dim=1)


class PGDAdversarialTraining(BatchLoss):
    """Madry et al. (2018): cross-entropy at the PGD point (uniform random start in the ball)."""

    needs = frozenset({"adversarial"})

    def __init__(self, attack: Attack = Attack()):
        super().__init__()
        self.attack = attack

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        a = self.attack
        x_adv = pgd_cross_entropy(model, x, target, a.eps, a.step_size, a.steps, a.clip)
        return F.cross_entropy(model(x_adv), target)


class CompSumParams(ClassifierTrainingParams):
    loss: LossName = Field(
        "comp-sum",
        description="comp-sum L_τ (standard training), its smooth adversarial "
        "version, or an adversarial baseline (TRADES, PGD-AT)",
    )
    tau: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        description="τ of the comp-sum family: 0 sum-exponential, 1 cross-entropy, (1,2) generalised CE, 2 MAE",
    )
    nu: float = Field(0.3, ge=0.0, le=100.0, description="weight ν of the smooth adversarial term (0: plain L_τ)")
    beta: float = Field(6.0, ge=0.0, le=100.0, description="TRADES β")
    eps: float = Field(0.1, ge=0.0, le=1.0, description="ℓ∞ radius γ for training attacks and robust accuracy")
    attack_steps: int = Field(10, ge=1, le=100, description="PGD steps inside training (step 2.5·γ/steps)")
    eval_steps: int = Field(20, ge=1, le=200, description="PGD steps of the robust-accuracy attack (0 radius: skipped)")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="SGD weight decay (the 'regularized' of the paper)")


def make_loss(params: CompSumParams, clip: tuple[float, float] | None) -> nn.Module:
    attack = Attack(params.eps, 2.5 * params.eps / params.attack_steps, params.attack_steps, clip)
    if params.loss == "comp-sum":
        return CompSum(params.tau)
    if params.loss == "smooth-adv-comp-sum":
        return SmoothAdvCompSum(params.tau, params.nu, attack)
    if params.loss == "trades":
        return TRADES(params.beta, attack)
    return PGDAdversarialTraining(attack)


@dataclass
class CompSumResult:
    test: dict[str, float]  # acc, ece, mce, nll, robust_acc (when eps > 0)
    val: dict[str, float]
    trained: TrainedClassifier


def train_comp_sum(ctx: RunContext, params: CompSumParams) -> CompSumResult:
    """Train with the chosen loss; clean metrics (accuracy, ECE, NLL) and PGD robust accuracy on val and test."""
    clip = (0.0, 1.0) if ctx.dataset is not None and ctx.dataset.kind == "image-class" else None  # images in [0, 1]
    trained = fit_calibrated(ctx, params, lambda data: make_loss(params, clip), "comp-sum")
    model, data = trained.model, trained.data
    splits = {}
    for split, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        stop_if_cancelled(ctx)
        scores = classification_metrics(predict_logits(model, x), y)
        if params.eps > 0:
            scores["robust_acc"] = robust_accuracy(model, x, y, params.eps, params.eval_steps, clip=clip)
        splits[split] = scores
    ctx.log(params.epochs, **{f"test_{k}": v for k, v in splits["test"].items()})
    return CompSumResult(splits["test"], splits["val"], trained)


@method(
    "comp-sum",
    family="classification",
    task="train",
    datasets=("image-class", "tabular"),
    params=CompSumParams,
    paper="Cross-Entropy Loss Functions: Theoretical Analysis and Applications",
    tiny={"epochs": 3, "hidden": 16, "batch_size": 128, "attack_steps": 2, "eval_steps": 2},
)
def run(ctx: RunContext, params: CompSumParams) -> None:
    """Train with a comp-sum loss L_τ, its smooth adversarial version, TRADES or PGD-AT; report clean
    accuracy, calibration and PGD robust accuracy, with learning curves and a reliability diagram."""
    result = train_comp_sum(ctx, params)
    name = params.loss if params.loss in ("trades", "pgd-at") else f"{params.loss} τ={params.tau:g}"
    save_training_plots(ctx, name, result.trained)


# -- reproduction -------------------------------------------------------------------------------

TAUS = (0.0, 0.5, 1.0, 1.5, 2.0)
# A grid like TRADES' β ∈ {1, 3, 6} does not fit this term: with the unsquared logit distance, ν = 3 already collapses
# the digits MLP to constant logits (10% accuracy), so the grid is shifted down; TRADES keeps the β = 6 of its paper.
NUS = (0.3, 1.0)
BETA = 6.0
# The gradient of L_τ in the logits scales like p_y^{τ−1}: at a shared learning rate τ < 1 diverges (τ = 0 at
# lr 0.05 ends at chance with NaN loss) and τ = 2 barely moves, so each τ gets its learning rate from this grid,
# chosen on the first seed's validation accuracy.
TAU_LRS = (0.05, 0.01, 0.002)


@reproduction(
    "comp-sum",
    claim="the smooth adversarial comp-sum algorithm (τ = 1) has higher clean accuracy than "
    "TRADES while matching its PGD-20 robust accuracy (within 1 point) on digits, ℓ∞ γ = 0.1",
    metric="clean test accuracy",
    direction="higher",
    baseline="TRADES",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Digits MLP, PGD-10 inside training, PGD-20 at test, per seed. ν is chosen on the validation split by the
    claim's own rule (the best clean accuracy among the ν whose mean robust accuracy is within 1 point of
    TRADES', else the most robust ν); the clean test accuracy of that ν and of TRADES is paired by seed, and
    the robust accuracy within 1 point of TRADES' (means over seeds) is the claim's further condition.
    PGD-AT and the clean comp-sum sweep over τ (standard training, learning rate per τ chosen on the first
    seed's validation split) are reported alongside."""
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    budget = {"epochs": 2, "attack_steps": 2, "eval_steps": 3} if smoke else {}
    variants: dict[str, dict] = {
        f"τ={t:g}": {"loss": "comp-sum", "tau": t, "eps": 0.0} for t in ((1.0, 2.0) if smoke else TAUS)
    }
    variants |= {f"smooth-adv ν={n:g}": {"loss": "smooth-adv-comp-sum", "nu": n} for n in (NUS[:1] if smoke else NUS)}
    variants |= {"TRADES": {"loss": "trades", "beta": BETA}, "PGD-AT": {"loss": "pgd-at"}}
    val: dict[str, list[dict[str, float]]] = {}
    test: dict[str, list[dict[str, float]]] = {}  # per variant, one row per seed in seed order
    chosen_lr: dict[str, float] = {}
    for name in sweep(ctx, variants):
        params = CompSumParams(checkpoint_every=0, **variants[name], **budget)
        todo = seeds
        if name.startswith("τ") and not smoke:  # learning rate per τ, on the first seed's validation split
            tried = {
                lr: train_comp_sum(HelperRunContext(ctx, seed, ds), params.model_copy(update={"lr": lr}))
                for lr in TAU_LRS
            }
            lr = max(tried, key=lambda lr: tried[lr].val["acc"])
            params, todo = params.model_copy(update={"lr": lr}), seeds[1:]
            chosen_lr[name] = lr
            val[name], test[name] = [tried[lr].val], [tried[lr].test]
        for s in todo:
            result = train_comp_sum(HelperRunContext(ctx, s, ds), params)
            val.setdefault(name, []).append(result.val)
            test.setdefault(name, []).append(result.test)
    mean = {name: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for name, rows in test.items()}
    val_mean = {name: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for name, rows in val.items()}
    base = "TRADES"
    candidates = [n for n in variants if n.startswith("smooth-adv")]
    close = [n for n in candidates if val_mean[n]["robust_acc"] >= val_mean[base]["robust_acc"] - 0.01]
    ours = (
        max(close, key=lambda n: val_mean[n]["acc"])
        if close
        else max(candidates, key=lambda n: val_mean[n]["robust_acc"])
    )
    ctx.save_artifact("comp_sum_accuracy.png", _summary_figure(mean), kind="plot")
    robust_ok = mean[ours]["robust_acc"] >= mean[base]["robust_acc"] - 0.01
    best_tau = max((n for n in mean if n.startswith("τ")), key=lambda n: mean[n]["acc"])
    note = (
        f"{ours} (chosen on val) vs {base}: clean {mean[ours]['acc']:.3f} vs {mean[base]['acc']:.3f}, robust "
        f"{mean[ours]['robust_acc']:.3f} vs {mean[base]['robust_acc']:.3f}; PGD-AT clean "
        f"{mean['PGD-AT']['acc']:.3f}, robust {mean['PGD-AT']['robust_acc']:.3f}; best clean comp-sum {best_tau} "
        f"({mean[best_tau]['acc']:.3f}); means over {len(seeds)} seed(s)"
    )
    taus = ", ".join(
        f"{n}: {mean[n]['acc']:.3f} (lr {chosen_lr.get(n, CompSumParams().lr):g})" for n in mean if n.startswith("τ")
    )
    note += f"; clean comp-sum accuracy {taus}"
    if not (robust_ok and mean[ours]["acc"] > mean[base]["acc"]):
        note += (
            ". Not reproduced at this scale: on a 128×2 MLP the unsquared logit-distance penalty (our reading of "
            "the smooth term) buys robustness only by flattening the logits, so no ν on the grid gains "
            "TRADES' robustness while keeping more clean accuracy"
        )
    return Outcome(
        ours=[r["acc"] for r in test[ours]],
        baseline=[r["acc"] for r in test[base]],
        holds=robust_ok,
        note=note,
        details={"test": mean, "val": val_mean, "chosen_nu": ours, "tau_lr": chosen_lr, "per_seed": test},
    )


def _summary_figure(mean: dict[str, dict[str, float]]):
    """Clean and robust test accuracy and ECE per variant (x = variant index, legend = name)."""
    panels = {
        metric: {name: ([i], [row[metric]]) for i, (name, row) in enumerate(mean.items()) if metric in row}
        for metric in ("acc", "robust_acc", "ece")
    }
    return curves_figure(panels, "variant", title="comp-sum family and adversarial training on digits (γ = 0.1)")
