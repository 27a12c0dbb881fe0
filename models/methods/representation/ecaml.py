"""ECAML: energy-confusion adversarial metric learning (Chen & Deng, "Energy Confused Adversarial
Metric Learning for Zero-Shot Image Retrieval and Clustering", AAAI 2019).

A metric loss on seen classes makes the embedding discriminative, and over-fits to the features
that separate exactly those classes. ECAML adds an adversarial "energy confusion" term that pulls
randomly sampled pairs — same class or not — together, so the embedding cannot rely on seen-class
specific directions and transfers better to unseen classes. With normalised embeddings f and, for
each anchor i, `partners` random partners j in the batch (the reference samples 10):

    E = Σ_(i,j) (1 / w_ij) · ½‖f_i − f_j‖²,   w_ij = #sampled positive pairs if y_i = y_j,
                                                       #sampled negative pairs otherwise,
    L_EC = log E,

so positive and negative pairs weigh equally however many were drawn. Because E is quadratic in f,
L_EC(a·f) = L_EC(f) + 2 log a. The adversarial part is the gradient routing of the reference
(Caffe `propagate_down: 0` below the EC branch): the EC branch shares the embedding layer W but
reads a detached backbone output, so W gets L_metric + λ·L_EC and the backbone L_metric only
(λ = 0.13 in the shipped config). The metric losses are pytorch-metric-learning's
(multi-similarity in place of the shipped binomial deviance, triplet, contrastive).

Checked against the notes on `chenbinghui1/ECAML` (`energy_confusion.cpp`, `train_confusion.prototxt`):
partner count, the per-kind weighting, the log and the blocked backbone gradient. Not verified:
whether the reference feeds the EC layer normalised or raw embeddings; here it reads the
L2-normalised ones the metric loss uses (on raw ones, shrinking W alone would drive log E to −∞).
Even so log E is unbounded below: on digits λ = 0.13 pulls the embeddings into a small cap of the
sphere (L_EC reaches about −10) while the ranking the metric loss learnt survives, which is what
retrieval and clustering read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.context import InMemoryRunContext, RunContext, cpu_threads
from models.datasets import load_builtin
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.representation.augment import image_splits
from models.representation.contrastive import resume, training_state
from models.representation.encoders import cnn_body, embed
from models.representation.evaluation import embedding_figure, zero_shot_metrics
from models.reproduction import Outcome, reproduction

MetricLossName = Literal["multi-similarity", "triplet", "contrastive"]


def energy_confusion(f: torch.Tensor, y: torch.Tensor, partners: int, generator: torch.Generator) -> torch.Tensor:
    """log Σ (1/w_ij)·½‖f_i − f_j‖² over `partners` random partners j ≠ i per anchor i."""
    b = len(f)
    offset = torch.randint(1, b, (b, partners), generator=generator).to(f.device)  # j = i + offset mod b, never i
    anchors = torch.arange(b, device=f.device)[:, None].expand(b, partners)
    mates = (anchors + offset) % b
    same = y[anchors] == y[mates]
    n_pos, n_neg = same.sum().clamp_min(1).to(f.dtype), (~same).sum().clamp_min(1).to(f.dtype)
    weight = torch.where(same, 1.0 / n_pos, 1.0 / n_neg)
    energy = (weight * 0.5 * (f[anchors] - f[mates]).pow(2).sum(-1)).sum()
    return torch.log(energy.clamp_min(1e-12))


class MetricEmbedder(nn.Module):
    """Conv-4 body → linear embedding W → L2 normalisation."""

    def __init__(self, width: int, embedding_dim: int, image_size: int):
        super().__init__()
        self.body = cnn_body(1, width, image_size)
        self.embedding = nn.Linear(width, embedding_dim)

    def forward(self, x: torch.Tensor, detach_body: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric embedding, EC-branch embedding): the same W, the second on a detached body output."""
        h = self.body(x)
        return F.normalize(self.embedding(h), dim=1), F.normalize(self.embedding(h.detach()), dim=1)


def make_metric_loss(name: MetricLossName) -> nn.Module:
    from pytorch_metric_learning import losses

    if name == "multi-similarity":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1)
    return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)


class ECAMLParams(MethodParams):
    loss: MetricLossName = Field("multi-similarity", description="base metric loss (pytorch-metric-learning)")
    ec_weight: float = Field(0.13, ge=0.0, le=10.0, description="λ of the energy-confusion term (0: the base loss)")
    partners: int = Field(10, ge=1, le=256, description="random partners per anchor in the confusion energy")
    seen_classes: int = Field(5, ge=2, le=1000, description="classes 0..S−1 train; the rest are unseen and tested")
    embedding_dim: int = Field(128, ge=2, le=2048, description="embedding size")
    width: int = Field(32, ge=4, le=512, description="CNN channels")
    image_size: int = Field(8, ge=8, le=64, description="input side (digits are 8×8)")
    iterations: int = Field(300, ge=1, le=100_000, description="training iterations")
    classes_per_batch: int = Field(5, ge=2, le=256, description="classes in a batch")
    samples_per_class: int = Field(16, ge=2, le=256, description="images per class in a batch")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the backbone")
    embedding_lr_mult: float = Field(
        10.0, gt=0.0, le=100.0, description="learning-rate multiplier of W (the reference's ×10)"
    )
    weight_decay: float = Field(2e-4, ge=0.0, le=1.0, description="Adam weight decay")
    eval_every: int = Field(100, ge=1, le=100_000, description="iterations between unseen-class evaluations")
    checkpoint_every: int = Field(100, ge=0, le=100_000, description="iterations between checkpoints (0: never)")
    plot: Literal["tsne", "pca"] = Field("tsne", description="2-D map of the unseen-class embeddings")


@dataclass
class ZeroShotData:
    x_seen: torch.Tensor
    y_seen: torch.Tensor
    x_unseen: torch.Tensor
    y_unseen: torch.Tensor


def zero_shot_split(ctx: RunContext, params: ECAMLParams) -> ZeroShotData:
    """All images of classes < S train, all images of the others test (the CUB/Cars protocol)."""
    if ctx.dataset is None:
        raise ValueError("ecaml needs an 'image-class' dataset")
    splits = image_splits(ctx.dataset, params.image_size)
    x = torch.cat([splits[s][0] for s in ("train", "val", "test")])
    y = torch.cat([splits[s][1] for s in ("train", "val", "test")])
    seen = y < params.seen_classes
    if seen.all() or not seen.any():
        raise ValueError(f"seen_classes={params.seen_classes} leaves no seen or no unseen class")
    return ZeroShotData(x[seen], y[seen], x[~seen], y[~seen])


def class_balanced_batch(y: torch.Tensor, classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `classes` random classes × `per_class` random images each (with replacement if short)."""
    labels = torch.unique(y)
    picked = labels[torch.randperm(len(labels), generator=generator)[:classes]]
    rows = []
    for c in picked:
        members = torch.nonzero(y == c).squeeze(1)
        rows.append(members[torch.randint(len(members), (per_class,), generator=generator)])
    return torch.cat(rows)


def train_ecaml(ctx: RunContext, params: ECAMLParams) -> tuple[MetricEmbedder, ZeroShotData, list[dict]] | None:
    data = zero_shot_split(ctx, params)
    torch.manual_seed(ctx.seed)
    model = MetricEmbedder(params.width, params.embedding_dim, params.image_size).to(ctx.device)
    metric_loss = make_metric_loss(params.loss)
    optimizer = torch.optim.Adam(
        [
            {"params": model.body.parameters(), "lr": params.lr},
            {"params": model.embedding.parameters(), "lr": params.lr * params.embedding_lr_mult},
        ],
        weight_decay=params.weight_decay,
    )
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = resume(ctx, model, optimizer, generator)
    model.train()
    for it in range(start, params.iterations):
        if ctx.cancelled():
            return None
        index = class_balanced_batch(data.y_seen, params.classes_per_batch, params.samples_per_class, generator)
        x, y = data.x_seen[index].to(ctx.device), data.y_seen[index].to(ctx.device)
        f, f_ec = model(x)
        l_metric = metric_loss(f, y)
        l_ec = energy_confusion(f_ec, y, params.partners, generator)
        loss = l_metric + params.ec_weight * l_ec
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = it + 1
        if done % params.eval_every == 0 or done == params.iterations:
            scores = zero_shot_metrics(embed_all(model, data.x_unseen), data.y_unseen.numpy(), ctx.seed)
            row = {
                "iteration": done,
                "metric_loss": l_metric.item(),
                "energy_confusion": l_ec.item(),
                "unseen_recall_at_1": scores["recall_at_1"],
                "unseen_nmi": scores["nmi"],
            }
            history.append(row)
            ctx.log(done, **{k: v for k, v in row.items() if k != "iteration"})
            ctx.progress(done, params.iterations, f"iteration {done}: unseen R@1 {scores['recall_at_1']:.3f}")
        if params.checkpoint_every and (done % params.checkpoint_every == 0 or done == params.iterations):
            ctx.save_checkpoint(training_state(model, optimizer, generator, done, history), done)
    return model, data, history


def embed_all(model: MetricEmbedder, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.embedding(embed(model.body, x)), dim=1).detach()


@method(
    "ecaml",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=ECAMLParams,
    paper="Energy Confused Adversarial Metric Learning for Zero-Shot Image Retrieval and Clustering",
)
def run(ctx: RunContext, params: ECAMLParams) -> None:
    """Metric learning on seen classes with the energy-confusion regulariser; Recall@k and NMI on unseen ones."""
    with cpu_threads(ctx.resources):
        result = train_ecaml(ctx, params)
        if result is None:
            return
        model, data, history = result
        z = embed_all(model, data.x_unseen)
        scores = zero_shot_metrics(z, data.y_unseen.numpy(), ctx.seed)
        ctx.log(params.iterations, **{f"unseen_{k}": v for k, v in scores.items()})
        steps = [r["iteration"] for r in history]
        panels = {
            k: {params.loss: (steps, [r[k] for r in history])}
            for k in ("unseen_recall_at_1", "unseen_nmi", "energy_confusion")
        }
        ctx.save_artifact("curves.png", curves_figure(panels, "iteration"), kind="plot")
        ctx.save_artifact(
            "unseen_embedding.png",
            embedding_figure(
                z.numpy(),
                data.y_unseen.numpy(),
                f"unseen classes, λ={params.ec_weight}: R@1 {scores['recall_at_1']:.3f}",
                params.plot,
                ctx.seed,
            ),
            kind="plot",
        )
        ctx.save_artifact("report.json", scores, kind="json")


# -- reproduction -------------------------------------------------------------------------------

LOSSES: tuple[MetricLossName, ...] = ("multi-similarity", "triplet", "contrastive")


@reproduction(
    "ecaml",
    claim="the energy-confusion term raises unseen-class Recall@1 by ≥ 1 point for at least 2 "
    "of 3 base metric losses (digits 0–4 seen, 5–9 unseen)",
    metric="unseen-class Recall@1 (mean over losses and seeds)",
    direction="higher",
    baseline="the same metric loss without energy confusion (λ = 0)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    ds = load_builtin("digits")
    losses = LOSSES[:1] if smoke else LOSSES
    seeds = [seed] if smoke else [seed, seed + 1]
    budget = {"iterations": 20 if smoke else 250, "checkpoint_every": 0}
    recall: dict[str, dict[str, float]] = {}
    jobs = [(loss, w) for loss in losses for w in (0.0, 0.13)]
    with cpu_threads(ctx.resources):
        for i, (loss, weight) in enumerate(jobs):
            if ctx.cancelled():
                raise InterruptedError("reproduction cancelled")
            values = []
            for s in seeds:
                params = ECAMLParams(loss=loss, ec_weight=weight, eval_every=budget["iterations"], **budget)
                _, _, history = train_ecaml(InMemoryRunContext(dataset=ds, seed=s), params)
                values.append(history[-1]["unseen_recall_at_1"])
            recall.setdefault(loss, {})["ecaml" if weight else "base"] = float(np.mean(values))
            ctx.progress(i + 1, len(jobs), f"{loss}, λ={weight}")
    gains = {loss: r["ecaml"] - r["base"] for loss, r in recall.items()}
    wins = sum(g >= 0.01 for g in gains.values())
    need = 2 if len(losses) == 3 else 1
    ours = float(np.mean([r["ecaml"] for r in recall.values()]))
    base = float(np.mean([r["base"] for r in recall.values()]))
    note = (
        f"R@1 gain ≥ 1 pt for {wins}/{len(losses)} losses (needs {need}); gains "
        + ", ".join(f"{k} {v:+.3f}" for k, v in gains.items())
        + f"; {len(seeds)} seed(s)"
    )
    return Outcome(
        ours=ours,
        baseline=base,
        seeds=len(seeds),
        holds=wins >= need,
        note=note,
        details={"recall_at_1": recall, "gains": gains},
    )
