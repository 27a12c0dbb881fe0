"""AMCL: adaptive multi-head contrastive learning, on SimCLR.

Paper: Lei Wang, Piotr Koniusz, Tom Gedeon and Liang Zheng, "Adaptive Multi-head Contrastive
Learning", ECCV 2024. Public code: https://github.com/LeiWangR/cl.

One projection head gives one similarity per pair, yet two views of one image are not always
alike and views of two images sometimes are. AMCL puts H projection heads on the encoder, each
with its own view of a pair's similarity, and gives every pair of every head its own temperature,
predicted from the pair and bounded:

    τ_h(i, j) = τ_min + (τ_max − τ_min)·σ(−⟨φ_h(ẑ_h,i), φ_h(ẑ_h,j)⟩),

    L = Σ_h NT-Xent_h(τ_h) + β·Σ_h mean_(i,j) Ω(τ_h(i, j)),   Ω(τ) = (D/2)·log τ + 1/τ,

where NT-Xent_h divides each cosine of head h by that pair's temperature, ẑ = z/‖z‖, φ_h is a
two-layer MLP, and Ω, minimal at τ = 2/D (D the projection size), keeps the temperatures away
from the bounds. H = 1, a constant τ and β = 0 give SimCLR's NT-Xent exactly (a unit test).

What is the paper's and what is ours. The paper derives its loss from a maximum-likelihood view
of head-wise posteriors of the positive given the observations; its equations could not be read
here, so the loss above is RECONSTRUCTED. The first public code is a fragment (it trains on
positive pairs only, and its regulariser indexes a dimension its tensor does not have). Our
reading: H = 3 heads, per-pair σ-bounded temperatures with τ_min = 1e-5 and τ_max = 2, Ω as
above with β = 0.1; the temperature network in the symmetric form of a later revision of the
reference code (`amcl/losses.py` there: a dot product of φ on the two embeddings through σ(−·)),
with one φ per head, and the full InfoNCE over all 2N − 2 negatives instead of that revision's
top-k linear surrogate. The paper also applies AMCL to MoCo and Barlow Twins; only SimCLR is
here.

Scale. 16×16 digits, the kit's Conv-4 body of width 32 (the representation), heads of D = 64
(hidden 128), batch 256, Adam 2e-3, 10 epochs, views from the kit's crop, rotation, noise and
erasing recipe (`augmentations` picks among them). The paper trains ResNets on ImageNet-scale
data for hundreds of epochs.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from models.context import InMemoryRunContext, RunContext
from models.datasets import load_builtin
from models.registry import method
from models.representation.augment import ViewRecipe, image_splits
from models.representation.contrastive import ContrastiveSchedule, fit_contrastive, simclr_objective
from models.representation.encoders import ContrastiveEncoder, embed
from models.representation.evaluation import evaluate_embeddings
from models.representation.job import RepresentationParams, finish_representation_job
from models.representation.losses import nt_xent
from models.reproduction import Outcome, reproduction, seeds_for, sweep


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


class AMCLParams(RepresentationParams):
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
    proj_dim: int = Field(64, ge=2, le=2048, description="projection size D of every head")


def train_amcl(ctx: RunContext, params: AMCLParams) -> tuple[AMCLModel, dict, list[dict[str, float]]]:
    """Train on the dataset's train split; (model, image splits, per-epoch history)."""
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

    schedule = ContrastiveSchedule.of(params)
    history = fit_contrastive(ctx, model, objective, x, recipe, schedule, epoch_metrics=temperature_stats)
    return model, splits, history


@method(
    "amcl",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=AMCLParams,
    paper="Adaptive Multi-head Contrastive Learning",
    tiny={"epochs": 2, "width": 8, "proj_dim": 8, "plot": "none"},
)
def run(ctx: RunContext, params: AMCLParams) -> None:
    """SimCLR with several projection heads and adaptive per-pair temperatures (reconstructed loss)."""
    model, splits, history = train_amcl(ctx, params)
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    finish_representation_job(
        ctx,
        params,
        method="amcl",
        step=params.epochs,
        train=(embed(model.body, x_tr), y_tr.numpy()),
        test=(embed(model.body, x_te), y_te.numpy()),
        history=history,
        curves=("train_loss", "tau_mean"),
        label="simclr" if params.baseline else "amcl",
        encoder=model,
    )


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
    seeds = seeds_for(seed, smoke)
    budget = {"epochs": 1 if smoke else 10, "checkpoint_every": 0}
    acc: dict[str, list[float]] = {"amcl": [], "simclr": []}
    tau_mean: list[float] = []
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        for name, baseline in (("amcl", False), ("simclr", True)):
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
        ours=acc["amcl"],
        baseline=acc["simclr"],
        margin=0.01,  # the claim's margin: at least one point, judged over seeds
        note=note,
        details={"probe": acc, "tau_mean": tau_mean},
    )
