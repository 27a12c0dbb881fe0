"""AMCL: adaptive multi-head contrastive learning (Wang, Koniusz, Gedeon & Zheng, ECCV 2024), on SimCLR.

Several projection heads h = 1..H each give their own view of a pair's similarity, and every pair
gets its own temperature, predicted from the pair and bounded:

    τ_h(i, j) = τ_min + (τ_max − τ_min)·σ(−⟨φ_h(ẑ_h,i), φ_h(ẑ_h,j)⟩),

    L = Σ_h NT-Xent_h(τ_h) + β·Σ_h mean_(i,j) Ω(τ_h(i, j)),   Ω(τ) = (D/2)·log τ + 1/τ,

where NT-Xent_h divides each cosine of head h by its own temperature and Ω, minimal at τ = 2/D
(D the projection size), keeps the temperatures from running to the bounds. H = 1, a constant
τ and β = 0 give SimCLR's NT-Xent exactly (a unit test).

RECONSTRUCTED, not verified against the paper's equations (its text could not be read here; the
notes say the first public code is a fragment that trains on positives only and whose regulariser
indexes a missing dimension). What was used: the notes' reading (H = 3, per-pair σ-bounded
temperature with τ_min = 1e-5 … τ_max = 2, Ω as above, β = 0.1), with the temperature network in
the symmetric form of a later revision of `LeiWangR/cl` (`amcl/losses.py`: a dot product of φ on
the two embeddings through σ(−·), Eq. 3 there) but one φ per head as in the notes, and the full
InfoNCE over all 2N − 2 negatives instead of that revision's top-k linear surrogate.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from models.context import InMemoryRunContext, RunContext, cpu_threads
from models.datasets import load_builtin
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.representation.augment import ViewRecipe, image_splits
from models.representation.contrastive import ContrastiveSchedule, fit_contrastive, simclr_objective
from models.representation.encoders import ContrastiveEncoder, embed, save_encoder
from models.representation.evaluation import embedding_figure, evaluate_embeddings
from models.representation.losses import nt_xent
from models.reproduction import Outcome, reproduction


class PairTemperature(nn.Module):
    """τ(i, j) = τ_min + (τ_max − τ_min)·σ(−⟨φ(z_i), φ(z_j)⟩) for all pairs of the 2N stacked views."""

    def __init__(self, dim: int, tau_min: float, tau_max: float, hidden: int = 64):
        super().__init__()
        self.tau_min, self.tau_max = tau_min, tau_max
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.phi(nn.functional.normalize(z, dim=1))
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-(p @ p.T))


def omega(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """(D/2)·log τ + 1/τ, minimal at τ = 2/D."""
    return 0.5 * dim * torch.log(tau) + 1.0 / tau


class AMCLModel(ContrastiveEncoder):
    def __init__(self, heads: int, width: int, proj_dim: int, tau_min: float, tau_max: float):
        super().__init__(width=width, proj_hidden=2 * proj_dim, proj_dim=proj_dim, heads=heads)
        self.temperatures = nn.ModuleList(PairTemperature(proj_dim, tau_min, tau_max) for _ in range(heads))


def amcl_loss(
    z1s: list[torch.Tensor], z2s: list[torch.Tensor], temperatures: list[torch.Tensor], beta: float
) -> torch.Tensor:
    """Σ_h [NT-Xent with per-pair τ_h + β·mean Ω(τ_h)] over heads (τ_h: [2N, 2N])."""
    total = 0.0
    for z1, z2, tau in zip(z1s, z2s, temperatures):
        off_diagonal = ~torch.eye(len(tau), dtype=torch.bool, device=tau.device)
        total = total + nt_xent(z1, z2, tau) + beta * omega(tau[off_diagonal], z1.shape[1]).mean()
    return total


def amcl_objective(beta: float):
    def objective(model: AMCLModel, v1, v2, index, generator) -> torch.Tensor:
        z1s, z2s = model(v1), model(v2)
        taus = [t(torch.cat([a, b])) for t, a, b in zip(model.temperatures, z1s, z2s)]
        return amcl_loss(z1s, z2s, taus, beta)

    return objective


class AMCLParams(MethodParams):
    heads: int = Field(3, ge=1, le=16, description="H projection heads (1 with adaptive τ: single-head AMCL)")
    beta: float = Field(0.1, ge=0.0, le=10.0, description="weight of the temperature regulariser Ω")
    tau_min: float = Field(1e-5, gt=0.0, le=1.0, description="lower bound of every pair temperature")
    tau_max: float = Field(2.0, gt=0.0, le=100.0, description="upper bound of every pair temperature")
    baseline: bool = Field(False, description="train single-head SimCLR with the fixed temperature instead")
    temperature: float = Field(0.2, gt=0.0, le=10.0, description="SimCLR's fixed τ (baseline only)")
    augmentations: str = Field(
        "crop,rotate,noise,erase",
        pattern=r"^(crop|rotate|noise|erase)(,(crop|rotate|noise|erase))*$",
        description="comma-separated view transforms",
    )
    width: int = Field(32, ge=4, le=512, description="CNN channels (= representation size)")
    proj_dim: int = Field(64, ge=2, le=2048, description="projection size D of every head")
    epochs: int = Field(10, ge=1, le=1000, description="training epochs")
    batch_size: int = Field(256, ge=4, le=8192, description="mini-batch size")
    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Adam learning rate")
    checkpoint_every: int = Field(5, ge=0, le=1000, description="checkpoint every N epochs (0: never)")
    plot: str = Field("tsne", pattern="^(tsne|pca)$", description="2-D map of the test embeddings")


def train_amcl(ctx: RunContext, params: AMCLParams):
    if ctx.dataset is None:
        raise ValueError("amcl needs an 'image-class' dataset")
    if params.tau_min >= params.tau_max:
        raise ValueError("tau_min must be below tau_max")
    splits = image_splits(ctx.dataset, 16)
    torch.manual_seed(ctx.seed)
    heads = 1 if params.baseline else params.heads
    model = AMCLModel(heads, params.width, params.proj_dim, params.tau_min, params.tau_max).to(ctx.device)
    objective = simclr_objective(params.temperature) if params.baseline else amcl_objective(params.beta)
    recipe = ViewRecipe(ops=tuple(params.augmentations.split(",")))
    schedule = ContrastiveSchedule(
        params.epochs, params.batch_size, params.lr, checkpoint_every=params.checkpoint_every
    )
    x = splits["train"][0]

    @torch.no_grad()
    def temperature_stats() -> dict[str, float]:
        if params.baseline:
            return {}
        model.eval()
        z = model(x[:256])
        model.train()
        taus = torch.cat([t(zh).flatten() for t, zh in zip(model.temperatures, z)])
        return {"tau_mean": taus.mean().item(), "tau_min_seen": taus.min().item(), "tau_max_seen": taus.max().item()}

    history = fit_contrastive(ctx, model, objective, x, recipe, schedule, epoch_metrics=temperature_stats)
    return None if history is None else (model, splits, history)


@method(
    "amcl",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=AMCLParams,
    paper="Adaptive Multi-head Contrastive Learning",
)
def run(ctx: RunContext, params: AMCLParams) -> None:
    """SimCLR with several projection heads and adaptive per-pair temperatures (reconstructed loss)."""
    with cpu_threads(ctx.resources):
        result = train_amcl(ctx, params)
        if result is None:
            return
        model, splits, history = result
        (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
        z_te = embed(model.body, x_te)
        report = evaluate_embeddings(embed(model.body, x_tr), y_tr.numpy(), z_te, y_te.numpy(), ctx.seed).metrics()
        ctx.log(params.epochs, **report)
        epochs = list(range(1, len(history) + 1))
        panels = {k: {"amcl": (epochs, [r[k] for r in history])} for k in ("train_loss", "tau_mean") if k in history[0]}
        ctx.save_artifact("curves.png", curves_figure(panels, "epoch"), kind="plot")
        ctx.save_artifact(
            "embedding.png",
            embedding_figure(
                z_te.numpy(), y_te.numpy(), f"probe {report['linear_probe_acc']:.3f}", params.plot, ctx.seed
            ),
            kind="plot",
        )
        ctx.save_artifact("report.json", report, kind="json")
        folder = save_encoder(ctx.workdir / "encoder", model, {"method": "amcl", **params.model_dump()})
        ctx.register_model(f"amcl-{ctx.job_id}", folder, {"method": "amcl", **report})


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "amcl",
    claim="AMCL (3 heads, adaptive temperatures) beats single-head SimCLR by ≥ 1 linear-probe "
    "point on digits with the full augmentation set",
    metric="linear-probe accuracy (test)",
    direction="higher",
    baseline="single-head SimCLR, τ = 0.2",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    ds = load_builtin("digits")
    seeds = [seed] if smoke else [seed, seed + 1]
    budget = {"epochs": 1 if smoke else 10, "checkpoint_every": 0}
    acc: dict[str, list[float]] = {"amcl": [], "simclr": []}
    tau_mean: list[float] = []
    with cpu_threads(ctx.resources):
        for i, s in enumerate(seeds):
            for name, baseline in (("amcl", False), ("simclr", True)):
                if ctx.cancelled():
                    raise InterruptedError("reproduction cancelled")
                model, splits, history = train_amcl(
                    InMemoryRunContext(dataset=ds, seed=s), AMCLParams(baseline=baseline, **budget)
                )
                if not baseline:
                    tau_mean.append(history[-1]["tau_mean"])
                (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
                acc[name].append(
                    evaluate_embeddings(
                        embed(model.body, x_tr), y_tr.numpy(), embed(model.body, x_te), y_te.numpy()
                    ).linear_probe_acc
                )
            ctx.progress(i + 1, len(seeds), f"seed {s}")
    ours, base = float(np.mean(acc["amcl"])), float(np.mean(acc["simclr"]))
    note = (
        f"probe AMCL {ours:.3f} vs SimCLR {base:.3f} over {len(seeds)} seed(s); mean learnt pair temperature "
        f"{np.mean(tau_mean):.3f} (Ω's minimum 2/D = {2 / AMCLParams().proj_dim:.3f}); loss reconstructed"
    )
    if ours < base + 0.01:
        note += (
            "; not evidence against the paper: the loss here is our reconstruction of equations we could not "
            "read, and at 10 epochs on 1,078 digits the adaptive temperatures have not shown an edge over a "
            "single fixed τ = 0.2"
        )
    return Outcome(
        ours=ours,
        baseline=base,
        seeds=len(seeds),
        holds=ours >= base + 0.01,
        note=note,
        details={"probe": acc, "tau_mean": tau_mean},
    )
