"""MLCD: multi-label cluster discrimination.

Paper: Xiang An, Kaicheng Yang, Xiangzi Dai, Ziyong Feng and Jiankang Deng, "Multi-label Cluster
Discrimination for Visual Representation Learning", ECCV 2024 (arXiv 2407.17331). Public code
and models: https://github.com/deepglint/unicom (the released MLCD models; the training loss is
not in it).

Cluster discrimination trains an encoder to classify each image into the cluster its off-the-shelf
embedding falls in. An image often shows several things, so MLCD gives it the l nearest of K
cluster centres as positive labels Ω_p and the rest as negatives Ω_n, and uses a loss whose
positive and negative parts are separate, so positives do not compete with each other as they
would under a softmax (eq. 6):

    L = log(1 + Σ_{j∈Ω_n} e^{s·cos θ_j}) + log(1 + Σ_{i∈Ω_p} e^{−s·cos θ_i}),

with cos θ the cosine between the normalised embedding and the normalised class prototypes, s a
scale. Negatives are sub-sampled PartialFC-style (a random fraction of Ω_n, all of Ω_p kept). The
baseline arms: l = 1 (single-label cluster discrimination) and a softmax cross-entropy averaged
over the same l positives (positives then compete).

The paper clusters LAION-400M into one million centres and trains ViTs. Here (our protocol, at
CPU scale): two-digit mosaics (two 8×8 digits side by side, 8×16, naturally multi-object; 3,000
for training), clustered by k-means on PCA-64 pixel features into K = 100 centres; the kit's
Conv-4 body of width 32 with a linear embedding of 64, Adam 2e-3, batch 128, 15 epochs. Probe:
digit-presence mAP of one-vs-rest logistic probes on the frozen body features of 1,000 test
mosaics. Not checked against the paper's text: l, the sampling ratio and the scale s. Ours: l = 3,
ratio 1.0 (every negative kept at K = 100), s = 16.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.registry import method
from models.representation.contrastive import resume, training_state
from models.representation.encoders import cnn_body, embed
from models.representation.job import RepresentationParams, finish_representation_job
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep

LossName = Literal["mlcd", "softmax"]


def separated_multilabel_loss(
    cos: torch.Tensor, positives: torch.Tensor, scale: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of log(1 + Σ_neg e^{s cos}) + log(1 + Σ_pos e^{−s cos}); `keep` masks sampled classes."""
    keep = torch.ones_like(positives) if keep is None else keep | positives
    neg = (scale * cos).masked_fill(~(keep & ~positives), float("-inf"))
    pos = (-scale * cos).masked_fill(~positives, float("-inf"))
    zero = torch.zeros(len(cos), 1, dtype=cos.dtype, device=cos.device)
    return (torch.logsumexp(torch.cat([zero, neg], 1), 1) + torch.logsumexp(torch.cat([zero, pos], 1), 1)).mean()


def softmax_multipositive_loss(cos: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor:
    """The competing alternative: mean over positives of −log softmax(s·cos)."""
    log_p = F.log_softmax(scale * cos, dim=1)
    return (-(log_p * positives).sum(1) / positives.sum(1)).mean()


def sample_classes(positives: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """PartialFC: every positive class of the batch plus a random `ratio` of the other classes."""
    present = positives.any(0)
    sampled = torch.rand(positives.shape[1], generator=generator) < ratio
    return (present | sampled)[None].expand_as(positives)


def two_digit_mosaics(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [1, 8, 16] of two random digits side by side, and their digit-presence targets [n, 10]."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    images = np.concatenate([x[a], x[b]], axis=-1)
    present = np.zeros((n, 10), dtype=np.float32)
    present[np.arange(n), y[a]] = 1
    present[np.arange(n), y[b]] = 1
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(present)


def cluster_labels(images: torch.Tensor, clusters: int, nearest: int, seed: int) -> torch.Tensor:
    """k-means on PCA-64 pixel features; the `nearest` closest centres of each image, as a [n, K] mask."""
    flat = images.flatten(1).numpy()
    feats = PCA(min(64, *flat.shape), random_state=seed).fit_transform(flat)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
    centres = KMeans(clusters, n_init=1, random_state=seed).fit(feats).cluster_centers_
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) + 1e-12
    top = torch.from_numpy(feats @ centres.T).topk(nearest, dim=1).indices
    return torch.zeros(len(flat), clusters, dtype=torch.bool).scatter_(1, top, True)


class ClusterClassifier(nn.Module):
    def __init__(self, width: int, embedding_dim: int, clusters: int):
        super().__init__()
        self.body = cnn_body(1, width, 8)
        self.embedding = nn.Linear(width, embedding_dim)
        self.prototypes = nn.Parameter(torch.randn(clusters, embedding_dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cos θ to every prototype."""
        return F.normalize(self.embedding(self.body(x)), dim=1) @ F.normalize(self.prototypes, dim=1).T


class MLCDParams(RepresentationParams):
    loss: LossName = Field("mlcd", description="separated multi-label loss, or a softmax over the same positives")
    nearest: int = Field(3, ge=1, le=64, description="l: closest centres used as positive labels (1: single-label)")
    clusters: int = Field(100, ge=2, le=100_000, description="K: k-means centres")
    scale: float = Field(16.0, gt=0.0, le=128.0, description="s: logit scale")
    negative_ratio: float = Field(1.0, gt=0.0, le=1.0, description="PartialFC fraction of negatives sampled")
    mosaics: int = Field(3000, ge=50, le=1_000_000, description="training mosaics")
    embedding_dim: int = Field(64, ge=2, le=2048, description="embedding matched to the prototypes")
    epochs: int = Field(15, ge=1, le=1000, description="training epochs")
    batch_size: int = Field(128, ge=2, le=8192, description="mini-batch size")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Adam weight decay")


def mosaic_features(model: ClusterClassifier, images: torch.Tensor) -> torch.Tensor:
    """Frozen body features of mosaics (what the probes read)."""
    return embed(model.body, images)


def digit_presence_map(model: ClusterClassifier, train: tuple, test: tuple) -> float:
    """mAP over digits of one-vs-rest logistic probes on frozen body features."""
    (xa, ya), (xb, yb) = train, test
    scaler = StandardScaler().fit(mosaic_features(model, xa).numpy())
    fa = scaler.transform(mosaic_features(model, xa).numpy())
    fb = scaler.transform(mosaic_features(model, xb).numpy())
    aps = []
    for d in range(ya.shape[1]):
        clf = LogisticRegression(max_iter=1000).fit(fa, ya[:, d].numpy())
        aps.append(average_precision_score(yb[:, d].numpy(), clf.decision_function(fb)))
    return float(np.mean(aps))


def train_mlcd(ctx: RunContext, params: MLCDParams):
    """Build the mosaics and their cluster labels (seeded by the run) and train; (model, train mosaics and
    digit-presence targets, 1,000 test mosaics and targets, per-epoch history)."""
    ds = ctx.dataset
    if ds is None or ds.kind != "image-class":
        raise ValueError("mlcd needs an 'image-class' dataset of 8×8 digits")
    x_tr, y_tr = np.asarray(ds.train["x"], dtype=np.float32), np.asarray(ds.train["y"])
    x_te, y_te = np.asarray(ds.test["x"], dtype=np.float32), np.asarray(ds.test["y"])
    images, present = two_digit_mosaics(x_tr, y_tr, params.mosaics, ctx.seed)
    test = two_digit_mosaics(x_te, y_te, 1000, ctx.seed + 1)
    labels = cluster_labels(images, params.clusters, params.nearest, ctx.seed)
    torch.manual_seed(ctx.seed)
    model = ClusterClassifier(params.width, params.embedding_dim, params.clusters).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = resume(ctx, model, optimizer, generator)
    for epoch in range(start, params.epochs):
        model.train()
        order, total = torch.randperm(len(images), generator=generator), 0.0
        for begin in range(0, len(images), params.batch_size):
            stop_if_cancelled(ctx)
            index = order[begin : begin + params.batch_size]
            cos, pos = model(images[index].to(ctx.device)), labels[index].to(ctx.device)
            if params.loss == "mlcd":
                keep = sample_classes(pos, params.negative_ratio, generator).to(ctx.device)
                loss = separated_multilabel_loss(cos, pos, params.scale, keep)
            else:
                loss = softmax_multipositive_loss(cos, pos, params.scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append({"train_loss": total / len(images)})
        ctx.log(epoch + 1, **history[-1])
        if params.checkpoint_every and ((epoch + 1) % params.checkpoint_every == 0 or epoch + 1 == params.epochs):
            ctx.save_checkpoint(training_state(model, optimizer, generator, epoch + 1, history), epoch + 1)
        ctx.progress(epoch + 1, params.epochs, f"epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f}")
    return model, (images, present), test, history


@method(
    "mlcd",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=MLCDParams,
    paper="Multi-label Cluster Discrimination for Visual Representation Learning",
    tiny={"mosaics": 60, "clusters": 6, "epochs": 2, "width": 8, "embedding_dim": 8, "batch_size": 32, "plot": "none"},
)
def run(ctx: RunContext, params: MLCDParams) -> None:
    """Cluster-discrimination pretraining with the l nearest centres as labels; digit-presence mAP probe."""
    model, train, test, history = train_mlcd(ctx, params)
    x_test, present = test
    finish_representation_job(
        ctx,
        params,
        method="mlcd",
        step=params.epochs,
        test=(mosaic_features(model, x_test), present.argmax(1).numpy()),
        evaluation="none",
        metrics={"digit_presence_map": digit_presence_map(model, train, test)},
        history=history,
        curves=("train_loss",),
        label=params.loss,
        title=lambda report: f"test mosaics by their lower digit: mAP {report['digit_presence_map']:.3f}",
    )


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "mlcd",
    claim="on two-digit mosaics, l = 3 nearest centres as labels beat single-label cluster "
    "discrimination (l = 1) by ≥ 2 mAP points and the softmax multi-positive loss",
    metric="digit-presence mAP (linear probe)",
    direction="higher",
    baseline="single-label (l = 1)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    ds = load_builtin("digits")
    budget = {"epochs": 1, "mosaics": 300, "clusters": 20, "checkpoint_every": 0} if smoke else {"checkpoint_every": 0}
    variants = {
        "mlcd l=3": {"nearest": 3},
        "single-label l=1": {"nearest": 1},
        "softmax l=3": {"nearest": 3, "loss": "softmax"},
    }
    seeds = seeds_for(seed, smoke)
    scores: dict[str, list[float]] = {name: [] for name in variants}
    runs = [(name, s) for name in variants for s in seeds]
    for name, s in sweep(ctx, runs, label=lambda run: f"{run[0]}, seed {run[1]}"):
        params = MLCDParams(**variants[name], **budget)
        model, train, test, _ = train_mlcd(InMemoryRunContext(dataset=ds, seed=s), params)
        scores[name].append(digit_presence_map(model, train, test))
    mean = {name: float(np.mean(v)) for name, v in scores.items()}
    ours, single = mean["mlcd l=3"], mean["single-label l=1"]
    note = "; ".join(f"{k}: mAP {v:.3f}" for k, v in mean.items()) + f"; {len(seeds)} seed(s)"
    if ours < single + 0.02:
        note += (
            f"; l = 3 leads l = 1 by {100 * (ours - single):.1f} pts, short of the 2-pt bar, likely "
            "because a mosaic holds exactly two digits and PCA-64 pixel clusters mix layout with identity, "
            "so extra nearest centres add labels that are partly about position rather than digit"
        )
    return Outcome(
        ours=scores["mlcd l=3"],
        baseline=scores["single-label l=1"],
        margin=0.02,  # the claim's margin: a lead of at least 2 points, judged over seeds
        checks=(
            Comparison("mAP vs the softmax multi-positive loss", scores["mlcd l=3"], scores["softmax l=3"], "higher"),
        ),
        note=note,
        details={"map": scores, "mean_map": mean},
    )
