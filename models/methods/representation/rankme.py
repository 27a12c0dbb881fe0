"""RankMe: a label-free score of a representation's quality (Garrido, Balestriero, Najman & LeCun,
"RankMe: Assessing the downstream performance of pretrained self-supervised representations by
their rank", ICML 2023).

For N embeddings of dimension D stacked as Z ∈ R^{N×D} with singular values σ_1 ≥ … ≥ σ_min(N,D),
the paper's eq. 1 is the smooth effective rank of Roy & Vetterli (2007):

    p_k = σ_k / ‖σ‖₁ + ε,   RankMe(Z) = exp(−Σ_k p_k log p_k),   ε = 1e-7.

It needs no labels and no hyper-parameters. A representation whose features collapse onto a few
directions scores low; the paper shows that, within one method, the run with the highest RankMe
has close to the best downstream linear-probe accuracy, so RankMe can pick hyper-parameters
without labels. Being a function of the singular values alone, it is invariant to rotations
(Z ↦ ZQ, Q orthogonal) and to scaling (Z ↦ aZ), and k equal singular values give exactly k (up to ε).

This module is an `evaluate` job: it embeds a split with any encoder registered by the
representation kit (`models.representation.encoders.save_encoder`), or the raw pixels when no
model is named, and reports RankMe together with the family's full evaluation suite when the
split has labels. Checked against a public implementation that quotes the paper's eqs. 1–2
(`decalmlutils.metrics.rankme.calc_rankme`): same ε = 1e-7 added after normalising, no centring,
25,600 samples by default. (Implementations built on `scipy.stats.entropy` renormalise p after
adding ε, which changes the score by O(ε·min(N, D)) only.) No official code was found.

The reproduction follows the paper's use of the score, shrunk to CPU minutes: for each of 3 seeds a
sweep of 9 SimCLR runs (projector size 2, 8, 64 × temperature 0.05, 0.2, 1.0; Conv-4 body of width
32, 16×16 digits, 8 epochs), RankMe of each body's features on the validation split (no labels),
and the Spearman correlation of RankMe with the linear probe over the sweep, against the same
correlation for minus the final contrastive loss (the label-free score one would use otherwise).
The paper sweeps hundreds of ImageNet runs of several joint-embedding methods.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field
from scipy.stats import spearmanr

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.registry import method
from models.representation.augment import ViewRecipe, image_splits
from models.representation.contrastive import ContrastiveSchedule, fit_contrastive, simclr_objective
from models.representation.encoders import ContrastiveEncoder, embed, load_encoder
from models.representation.evaluation import linear_probe_accuracy, rankme
from models.representation.job import EmbeddingPlotParams, finish_representation_job
from models.reproduction import Outcome, reproduction, seeds_for, sweep


class RankMeParams(EmbeddingPlotParams):
    model: str | None = Field(None, description="registered encoder to score ('name@version'); none: the raw pixels")
    split: Literal["train", "val", "test"] = Field("test", description="split whose embeddings are scored")
    max_samples: int = Field(25600, ge=2, le=1_000_000, description="embeddings used for RankMe (the paper's 25,600)")
    eps: float = Field(1e-7, gt=0.0, le=1e-2, description="ε added to the normalised singular values")
    full_evaluation: bool = Field(
        True,
        description="also run linear probe, k-NN, NMI/ARI and Recall@k (needs labels; probes fit on the train split)",
    )
    image_size: int = Field(16, ge=4, le=256, description="input side for raw pixels (an encoder uses its own)")


def _features(ctx: RunContext, params: RankMeParams) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Embeddings and labels of the scored split (and of train, for the probes)."""
    if ctx.dataset is None:
        raise ValueError("rankme needs an 'image-class' dataset to embed")
    body, size = None, params.image_size
    if params.model is not None:
        body, config = load_encoder(ctx.load_model(params.model))
        size = int(config["image_size"])
    splits = image_splits(ctx.dataset, size)
    wanted = [params.split] + (["train"] if params.full_evaluation and params.split != "train" else [])
    out = {}
    for name in wanted:
        x, y = splits[name]
        x, y = x[: params.max_samples], y[: params.max_samples]
        z = x.flatten(1) if body is None else embed(body.to(ctx.device), x.to(ctx.device)).cpu()
        out[name] = (z, y.numpy())
    return out


@method(
    "rankme",
    family="representation",
    task="evaluate",
    datasets=("image-class",),
    params=RankMeParams,
    paper="RankMe: Assessing the downstream performance of pretrained self-supervised representations by their rank",
    tiny={"image_size": 8, "max_samples": 300, "plot": "none"},
)
def run(ctx: RunContext, params: RankMeParams) -> None:
    """Score an encoder's embeddings by their effective rank (no labels), plus the evaluation suite."""
    stop_if_cancelled(ctx)
    checkpoint = ctx.load_checkpoint()
    if checkpoint is not None:  # embeddings already computed by an earlier attempt
        feats = {k: (v["z"], v["y"]) for k, v in checkpoint.state["features"].items()}
    else:
        ctx.progress(0, 3, "embedding")
        feats = _features(ctx, params)
        ctx.save_checkpoint({"features": {k: {"z": z, "y": y} for k, (z, y) in feats.items()}}, 1)
    stop_if_cancelled(ctx)
    z, y = feats[params.split]
    score = rankme(z, params.eps)
    s = torch.linalg.svdvals(z.double())
    ctx.log(0, rankme=score, dim=z.shape[1], samples=len(z), top_singular_value=float(s[0]))
    ctx.progress(1, 3, f"RankMe {score:.2f} of at most {min(z.shape)}")
    full = params.full_evaluation and len(np.unique(y)) > 1
    name = params.model or "pixels"
    finish_representation_job(
        ctx,
        params,
        method="rankme",
        step=0,
        test=(z, y),
        train=feats["train"] if full else None,
        evaluation="probes" if full else "none",
        metrics={"rankme": score},  # at the requested ε (the suite's own RankMe uses the default)
        title=lambda report: f"{name} on {params.split}: RankMe {score:.1f}",
        report={"samples": len(z), "dim": z.shape[1], "model": name},
    )
    ctx.progress(2, 3, "spectrum")
    ctx.save_artifact("spectrum.png", _spectrum_figure(s, score), kind="plot")
    ctx.progress(3, 3, f"RankMe {score:.2f}")


def _spectrum_figure(s: torch.Tensor, score: float) -> Figure:
    fig = Figure(figsize=(4.4, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(np.arange(1, len(s) + 1), (s / s.sum()).numpy(), marker="o", markersize=3)
    ax.axvline(score, color="tab:red", linestyle="--", label=f"RankMe {score:.1f}")
    ax.set(xlabel="singular value index k", ylabel="σ_k / ‖σ‖₁")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "rankme",
    claim="across a SimCLR hyper-parameter sweep on digits RankMe rank-correlates with "
    "linear-probe accuracy (Spearman ≥ 0.6) and the run it selects is within 2 points "
    "of the label-selected best",
    metric="Spearman correlation with linear-probe accuracy",
    direction="higher",
    baseline="−(final contrastive loss) as the label-free score",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """The paper's model-selection protocol, shrunk: per seed, SimCLR runs over projector dimension ×
    temperature (Conv-4 body, width 32, 16×16 digits); RankMe of the body's features on the held-out val
    split (labels unused), linear probe fit on train and scored on test; the Spearman correlation of
    RankMe (and of −final loss, the baseline score) with the probe over that seed's sweep."""
    splits = image_splits(load_builtin("digits"), 16)
    (x_train, y_train), (x_val, _), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    grid = [(d, t) for d in ((4, 64) if smoke else (2, 8, 64)) for t in ((0.1, 1.0) if smoke else (0.05, 0.2, 1.0))]
    schedule = ContrastiveSchedule(epochs=1 if smoke else 8, batch_size=256, lr=2e-3)
    if smoke:
        x_train, y_train = x_train[:512], y_train[:512]
    seeds = seeds_for(seed, smoke)
    runs: list[dict] = []
    items = [(s, proj_dim, tau) for s in seeds for proj_dim, tau in grid]
    for s, proj_dim, tau in sweep(ctx, items, label=lambda item: f"seed {item[0]}, proj {item[1]}, τ {item[2]}"):
        torch.manual_seed(s)
        model = ContrastiveEncoder(width=32, proj_hidden=64, proj_dim=proj_dim)
        history = fit_contrastive(
            InMemoryRunContext(seed=s), model, simclr_objective(tau), x_train, ViewRecipe(), schedule
        )
        probe = linear_probe_accuracy(
            embed(model.body, x_train).numpy(), y_train.numpy(), embed(model.body, x_test).numpy(), y_test.numpy()
        )
        runs.append(
            {
                "seed": s,
                "proj_dim": proj_dim,
                "temperature": tau,
                "probe_acc": probe,
                "rankme": rankme(embed(model.body, x_val)),
                "final_loss": history[-1]["train_loss"],
            }
        )
    rho, rho_loss, gap, picked = [], [], [], []
    for s in seeds:
        mine = [r for r in runs if r["seed"] == s]
        probe = np.array([r["probe_acc"] for r in mine])
        rho.append(float(np.nan_to_num(spearmanr([r["rankme"] for r in mine], probe).statistic)))
        rho_loss.append(float(np.nan_to_num(spearmanr([-r["final_loss"] for r in mine], probe).statistic)))
        choice = mine[int(np.argmax([r["rankme"] for r in mine]))]
        picked.append(f"proj {choice['proj_dim']}, τ {choice['temperature']}")
        gap.append(float(probe.max() - choice["probe_acc"]))
    mean_rho, mean_rho_loss, mean_gap = float(np.mean(rho)), float(np.mean(rho_loss)), float(np.mean(gap))
    ctx.save_artifact("rankme_vs_probe.png", _sweep_figure(runs, mean_rho), kind="plot")
    probe = np.array([r["probe_acc"] for r in runs])
    note = (
        f"{len(grid)} runs per seed over {len(seeds)} seed(s); RankMe picks {'; '.join(picked)}, "
        f"{100 * mean_gap:.1f} pts below the label-selected best on average; probe spread "
        f"{probe.min():.3f}–{probe.max():.3f}"
    )
    if mean_rho_loss > mean_rho:
        note += (
            f"; here −loss tracks the probe better (ρ {mean_rho_loss:.2f} vs {mean_rho:.2f}): the sweep is narrow "
            f"(all runs within {100 * (probe.max() - probe.min()):.1f} pts) and the final losses happen to order "
            "the runs"
        )
    return Outcome(
        ours=rho,
        baseline=rho_loss,
        # the claim's other conditions: ρ ≥ 0.6, and RankMe's pick within 2 points of the best (means over seeds)
        holds=bool(mean_rho >= 0.6 and mean_gap <= 0.02),
        note=note,
        details={"runs": runs, "spearman": rho, "spearman_loss": rho_loss, "selection_gap": gap},
    )


def _sweep_figure(runs: list[dict], rho: float) -> Figure:
    fig = Figure(figsize=(4.6, 3.6), layout="constrained")
    ax = fig.subplots()
    for r in runs:
        ax.scatter(r["rankme"], r["probe_acc"], s=18)
        ax.annotate(f"d{r['proj_dim']} τ{r['temperature']}", (r["rankme"], r["probe_acc"]), fontsize=6)
    ax.set(
        xlabel="RankMe (val, no labels)",
        ylabel="linear-probe accuracy (test)",
        title=f"SimCLR sweeps on digits: mean Spearman ρ = {rho:.2f}",
    )
    ax.grid(alpha=0.3)
    return fig
