"""DSL: attention-based dynamic subspace learners, against a single metric learner and a fixed number of
learners.

Paper: Sukesh Adiga Vasudeva, Jose Dolz and Herve Lombaert, "Attention-based Dynamic Subspace Learners
for Medical Image Analysis", IEEE Journal of Biomedical and Health Informatics, 2022. Public code:
https://github.com/adigasu/Dynamic_subspace_learners.

One embedding is split into K learner slices, each L2-normalised on its own (divide-and-conquer
metric learning, Sanakoyeu et al. CVPR 2019): the training images are k-means-clustered in the
embedding into K groups (re-clustered every few epochs, clusters matched to the previous ones so
that a learner keeps its data), and group k trains only slice k with a margin loss. DSL adds:

- spatial attention (Sec. III-A): A = σ(conv₃ₓ₃(ReLU(conv₃ₓ₃(ReLU(conv₃ₓ₃(F)))))), C → C/8 → C/32 → 1
  channels; the embedding reads the average pool of F ⊙ A. A is a per-position gate in (0, 1) — a
  sigmoid, not a softmax, so it does not sum to one over positions;
- dynamic learners (Sec. III-B): training starts with K = 1. When the validation NMI has not
  improved for `patience` epochs since its best, the neurons of the last learner are scored by the
  first-order Taylor criterion s_n = |mean over samples of a_n·∂L/∂a_n|, normalised (÷‖s‖₂, then
  min–max to [0, 1]). If the learner has more than 10 neurons and at least 5 score above 0.5, those
  stay in it (their weights moved to its first positions) and the rest of its positions are
  re-initialised as a new learner; K grows by one and the data is re-clustered;
- a final fine-tuning phase trains the whole embedding as one learner.

The margin loss (Wu et al. 2017; margin 0.2, β = 1.2) and distance-weighted sampling (cutoff 0.5,
non-zero-loss cutoff 1.4) are pytorch-metric-learning's `MarginLoss` and `DistanceWeightedMiner`;
clustering is scikit-learn's k-means.

Read against `adigasu/Dynamic_subspace_learners` (`lib/model.py`: AttentionLayer, FilterLearner,
split_neurons, init_splitted; `train.py`; `config.json`). Deviations: β is fixed at 1.2 (the
reference's β is a parameter of the criterion, which its optimizer never receives, so it never
moves either); the reference moves kept neurons one row at a time, which overwrites a source row
when a kept neuron already sits among the first positions — here the rows move all at once, so
kept weights are unchanged (a unit test); the NMI that triggers growth is measured on held-out
images of the seen classes (the reference reads its evaluation set); Adam's moments of the
re-initialised rows are kept, as in the reference. At digits scale: a 3-block conv body on 8×8
digits (4×4 feature maps), 30 epochs of class-balanced batches with patience 3 and a 5-epoch
fine-tune, instead of ResNet-50, 300 epochs, patience 10, 50-epoch fine-tune; Adam 1e-3 (the
reference's 1e-5), weight decay 1e-4, batches of 5 classes × 16 images. Evaluation: the zero-shot
protocol of `models.representation.zero_shot` — digits 0–4 train, 5–9 are unseen and scored by
Recall@k and k-means NMI. The paper's weak-segmentation claim (attention maps against CAM, in Dice)
needs foreground masks and is not reproduced; the attention maps are saved as an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.diffusion.grids import image_grid
from models.nn.backbones import small_cnn
from models.params import ResumableParams
from models.registry import method
from models.representation.contrastive import resume, training_state
from models.representation.evaluation import sklearn_kmeans, zero_shot_metrics
from models.representation.job import EmbeddingPlotParams, finish_representation_job
from models.representation.zero_shot import class_balanced_batch, zero_shot_split
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep

# -- the model -------------------------------------------------------------------------------------


class SpatialAttention(nn.Module):
    """σ(conv(ReLU(conv(ReLU(conv(F)))))): one gate in (0, 1) per position of the [B, C, h, w] maps."""

    def __init__(self, channels: int):
        super().__init__()
        mid, low = max(1, channels // 8), max(1, channels // 32)
        self.layers = nn.Sequential(
            nn.Conv2d(channels, mid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(mid, low, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(low, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.layers(f)


def equal_slices(dim: int, learners: int) -> list[torch.Tensor]:
    """Contiguous learner index sets of ⌈dim/K⌉ neurons (the last one shorter), as `init_splitted`."""
    size = math.ceil(dim / learners)
    return [torch.arange(k * size, min((k + 1) * size, dim)) for k in range(learners) if k * size < dim]


class SubspaceEmbedder(nn.Module):
    """Conv body → attention-gated average pool → linear embedding, L2-normalised per learner slice."""

    def __init__(self, width: int, embedding_dim: int, learners: int):
        super().__init__()
        # `small_cnn` pools while it believes the map is ≥ 4 wide: told 4, it pools once, so 8×8
        # digits leave 4×4 maps — something for the attention to choose among.
        self.body = small_cnn(1, 1, width=width, blocks=3, image_size=4).body[:-2]
        self.attention = SpatialAttention(width)
        self.embedding = nn.Linear(width, embedding_dim)
        self.learners = equal_slices(embedding_dim, learners)
        for idx in self.learners:  # each slice initialised as its own layer, as the reference does
            reinitialise_rows(self.embedding, idx)

    def pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention-pooled features [B, C], attention maps [B, 1, h, w])."""
        f = self.body(x)
        a = self.attention(f)
        return (f * a).mean((2, 3)), a

    def normalise_slices(self, e: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(e)
        for idx in self.learners:
            out[:, idx] = F.normalize(e[:, idx], dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise_slices(self.embedding(self.pooled(x)[0]))


def reinitialise_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    """Fresh Xavier-normal weights and nn.Linear-style biases for the output neurons `rows`."""
    fresh = nn.Linear(layer.in_features, len(rows))
    nn.init.xavier_normal_(fresh.weight)
    with torch.no_grad():
        layer.weight[rows] = fresh.weight
        layer.bias[rows] = fresh.bias


def taylor_scores(activation_times_gradient: torch.Tensor) -> torch.Tensor:
    """|mean a·∂L/∂a| per neuron, ÷ its L2 norm, then min–max to [0, 1] (FilterLearner.normalize_ranks)."""
    v = activation_times_gradient.abs()
    v = v / torch.sqrt((v * v).sum() + 1e-8)
    return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)


def split_last_learner(
    model: SubspaceEmbedder, scores: torch.Tensor, threshold: float = 0.5, min_kept: int = 5, min_size: int = 10
) -> bool:
    """Grow a learner from the last one's low-scoring neurons; False when the rule declines.

    `scores` holds one Taylor score per neuron of the last learner (its order). Kept neurons'
    weights move, all at once, to the learner's first positions; the remaining positions are
    re-initialised and become the new, last learner.
    """
    last = model.learners[-1]
    if len(last) <= min_size:
        return False
    order = torch.argsort(scores, descending=True, stable=True)
    kept = order[scores[order] > threshold]
    if len(kept) < min_kept or len(kept) == len(last):
        return False
    stay, fresh = last[: len(kept)], last[len(kept) :]
    with torch.no_grad():
        w, b = model.embedding.weight[last[kept]].clone(), model.embedding.bias[last[kept]].clone()
        model.embedding.weight[stay], model.embedding.bias[stay] = w, b
    reinitialise_rows(model.embedding, fresh)
    model.learners = model.learners[:-1] + [stay.clone(), fresh.clone()]
    return True


# -- divide and conquer ------------------------------------------------------------------------------


def matched_clusters(z: torch.Tensor, k: int, previous: torch.Tensor | None, seed: int) -> torch.Tensor:
    """k-means of the embeddings into k groups, relabelled to overlap most with the previous grouping
    (Hungarian matching), so learner j keeps training on mostly the same images after re-clustering."""
    if k == 1:
        return torch.zeros(len(z), dtype=torch.long)
    labels = torch.from_numpy(sklearn_kmeans(z, k, seed)).long()
    if previous is None or int(previous.max()) + 1 != k:
        return labels
    overlap = torch.zeros(k, k)
    overlap.index_put_((labels, previous), torch.ones(len(z)), accumulate=True)
    rows, cols = linear_sum_assignment(-overlap.numpy())
    relabel = torch.empty(k, dtype=torch.long)
    relabel[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return relabel[labels]


def make_margin_loss():
    from pytorch_metric_learning import losses, miners

    return (
        losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=False),
        miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
    )


def learner_loss(z: torch.Tensor, y: torch.Tensor, loss_fn, miner, generator: torch.Generator) -> torch.Tensor:
    """Margin loss on distance-weighted triplets; PML samples with torch's global generator, so it runs
    under a forked one seeded from the run's generator (a resumed run draws the same triplets)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return loss_fn(z, y, miner(z, y))


# -- params and training -----------------------------------------------------------------------------


class DSLParams(EmbeddingPlotParams, ResumableParams):
    """The representation family's shared fields where they apply (epochs of class-balanced batches, no
    `batch_size`) and DSL's own."""

    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="Adam weight decay")
    epochs: int = Field(30, ge=1, le=1000, description="training epochs")
    checkpoint_every: int = Field(5, ge=0, le=1000, description="checkpoint every N epochs (0: never)")
    width: int = Field(32, ge=8, le=512, description="CNN channels")
    mode: Literal["dynamic", "fixed"] = Field(
        "dynamic", description="grow learners on NMI plateaus, or keep `learners` fixed (1: a single metric learner)"
    )
    learners: int = Field(1, ge=1, le=32, description="learners at the start (dynamic) or throughout (fixed)")
    max_learners: int = Field(8, ge=1, le=32, description="dynamic mode never grows beyond this")
    patience: int = Field(3, ge=1, le=100, description="epochs without a new best validation NMI before a split")
    split_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="normalised Taylor score a neuron needs to stay")
    recluster_every: int = Field(2, ge=1, le=100, description="epochs between k-means re-clusterings")
    finetune_epochs: int = Field(5, ge=0, le=1000, description="last epochs train the whole embedding as one learner")
    seen_classes: int = Field(5, ge=2, le=1000, description="classes 0..S−1 train; the rest are unseen and tested")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="held-out seen-class images for the growth NMI")
    embedding_dim: int = Field(128, ge=4, le=2048, description="embedding size (shared by all learners)")
    batches_per_epoch: int = Field(
        9, ge=1, le=10_000, description="class-balanced batches per epoch (round-robin over learners)"
    )
    classes_per_batch: int = Field(5, ge=2, le=256, description="classes in a batch")
    samples_per_class: int = Field(16, ge=2, le=256, description="images per class in a batch")
    eval_every: int = Field(5, ge=1, le=1000, description="epochs between unseen-class evaluations (curves only)")


DIGIT_SIDE = 8  # digits at their own 8×8: the body is sized for it


@dataclass
class GrowthState:
    """What decides the rest of a run beyond weights: learners, clusters, the NMI plateau tracker."""

    assignment: torch.Tensor | None = None
    best_nmi: float = -1.0
    best_epoch: int = -1
    explore: bool = True
    recluster_now: bool = True
    splits: list[int] = field(default_factory=list)

    def state(self, model: SubspaceEmbedder) -> dict:
        return {
            "learners": [idx.clone() for idx in model.learners],
            "assignment": self.assignment,
            "best_nmi": self.best_nmi,
            "best_epoch": self.best_epoch,
            "explore": self.explore,
            "recluster_now": self.recluster_now,
            "splits": list(self.splits),
        }

    @classmethod
    def restore(cls, state: dict, model: SubspaceEmbedder) -> GrowthState:
        model.learners = [torch.as_tensor(idx).long() for idx in state["learners"]]
        return cls(
            state["assignment"],
            state["best_nmi"],
            state["best_epoch"],
            state["explore"],
            state["recluster_now"],
            list(state["splits"]),
        )


@torch.no_grad()
def embed_all(model: SubspaceEmbedder, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The full embedding (every slice unit-norm), in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def clustering_nmi(z: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    return float(normalized_mutual_info_score(y.numpy(), sklearn_kmeans(z, len(torch.unique(y)), seed)))


@dataclass
class DSLResult:
    model: SubspaceEmbedder
    x_unseen: torch.Tensor
    y_unseen: torch.Tensor
    history: list[dict]
    growth: GrowthState


def train_dsl(ctx: RunContext, params: DSLParams) -> DSLResult:
    """Train on the seen classes (a held-out share of them drives the growth); the model and the unseen
    classes, with the per-epoch history and the growth record."""
    data = zero_shot_split(ctx.dataset, params.seen_classes, DIGIT_SIDE)
    order = torch.randperm(len(data.y_seen), generator=torch.Generator().manual_seed(ctx.seed))
    n_val = int(len(order) * params.val_fraction)
    x_val, y_val = data.x_seen[order[:n_val]], data.y_seen[order[:n_val]]
    x_tr, y_tr = data.x_seen[order[n_val:]], data.y_seen[order[n_val:]]
    torch.manual_seed(ctx.seed)
    model = SubspaceEmbedder(params.width, params.embedding_dim, params.learners).to(ctx.device)
    loss_fn, miner = make_margin_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = resume(ctx, model, optimizer, generator)
    growth = GrowthState.restore(ctx.load_checkpoint().state["growth"], model) if start else GrowthState()
    model.train()
    for epoch in range(start, params.epochs):
        finetune = epoch >= params.epochs - params.finetune_epochs
        k = 1 if finetune else len(model.learners)
        if growth.recluster_now or epoch % params.recluster_every == 0 or finetune:
            growth.assignment = matched_clusters(embed_all(model, x_tr), k, growth.assignment, ctx.seed + epoch)
            growth.recluster_now = False
        taylor = torch.zeros(params.embedding_dim)
        losses = []
        for b in range(params.batches_per_epoch):
            stop_if_cancelled(ctx)
            learner = b % k
            members = torch.nonzero(growth.assignment == learner).squeeze(1)
            if len(members) < 2:
                continue
            index = members[
                class_balanced_batch(y_tr[members], params.classes_per_batch, params.samples_per_class, generator)
            ]
            z = model(x_tr[index].to(ctx.device))
            z.retain_grad()
            part = F.normalize(z, dim=1) if finetune else z[:, model.learners[learner]]
            loss = learner_loss(part, y_tr[index].to(ctx.device), loss_fn, miner, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if z.grad is not None:
                taylor += (z.detach() * z.grad).sum(0).cpu()
        done = epoch + 1
        val_nmi = clustering_nmi(embed_all(model, x_val), y_val, ctx.seed)
        if val_nmi > growth.best_nmi:
            growth.best_nmi, growth.best_epoch, growth.explore = val_nmi, epoch, True
        if (
            params.mode == "dynamic"
            and not finetune
            and growth.explore
            and len(model.learners) < params.max_learners
            and epoch >= growth.best_epoch + params.patience
        ):
            last = model.learners[-1]
            if split_last_learner(model, taylor_scores(taylor[last]), params.split_threshold):
                growth.explore, growth.recluster_now = False, True
                growth.splits.append(done)
        row = {
            "epoch": done,
            "train_loss": float(np.mean(losses)) if losses else 0.0,
            "val_nmi": val_nmi,
            "learners": float(len(model.learners)),
        }
        if done % params.eval_every == 0 or done == params.epochs:
            scores = zero_shot_metrics(embed_all(model, data.x_unseen), data.y_unseen.numpy(), ctx.seed)
            row.update(unseen_recall_at_1=scores["recall_at_1"], unseen_nmi=scores["nmi"])
        history.append(row)
        ctx.log(done, **{k_: v for k_, v in row.items() if k_ != "epoch"})
        if params.checkpoint_every and (done % params.checkpoint_every == 0 or done == params.epochs):
            ctx.save_checkpoint(
                {**training_state(model, optimizer, generator, done, history), "growth": growth.state(model)}, done
            )
        ctx.progress(done, params.epochs, f"epoch {done}: {len(model.learners)} learner(s), val NMI {val_nmi:.3f}")
    return DSLResult(model, data.x_unseen, data.y_unseen, history, growth)


@torch.no_grad()
def attention_panel(model: SubspaceEmbedder, x: torch.Tensor) -> bytes:
    """PNG: a row of digits over a row of their attention maps (nearest-upsampled to the image size)."""
    model.eval()
    _, a = model.pooled(x)
    model.train()
    maps = F.interpolate(a, size=x.shape[-2:], mode="nearest")
    return image_grid(torch.cat([x / x.amax((1, 2, 3), keepdim=True).clamp_min(1e-8), maps]), nrow=len(x), scale=6)


@method(
    "dsl",
    family="representation",
    task="train",
    datasets=("image-class",),
    params=DSLParams,
    paper="Attention-based Dynamic Subspace Learners for Medical Image Analysis",
    tiny={
        "epochs": 2,
        "batches_per_epoch": 1,
        "samples_per_class": 4,
        "width": 8,
        "embedding_dim": 16,
        "finetune_epochs": 0,
        "plot": "none",
    },
)
def run(ctx: RunContext, params: DSLParams) -> None:
    """Divide-and-conquer metric learning with attention and learners added on NMI plateaus; unseen-class scores."""
    result = train_dsl(ctx, params)
    learners = result.model.learners
    finish_representation_job(
        ctx,
        params,
        method="dsl",
        step=params.epochs,
        test=(embed_all(result.model, result.x_unseen), result.y_unseen.numpy()),
        evaluation="zero-shot",
        prefix="unseen_",
        metrics={"learners_final": float(len(learners))},
        history=result.history,
        curves=("val_nmi", "learners", "unseen_recall_at_1"),
        label=params.mode,
        title=f"unseen classes, {len(learners)} learner(s)",
        plot_name="unseen_embedding.png",
        report={"learner_sizes": [len(i) for i in learners], "split_epochs": result.growth.splits},
    )
    ctx.save_artifact("attention.png", attention_panel(result.model, result.x_unseen[:10]), kind="image")


# -- reproduction -------------------------------------------------------------------------------

ARMS = {
    "single": {"mode": "fixed", "learners": 1},
    "fixed-2": {"mode": "fixed", "learners": 2},
    "fixed-4": {"mode": "fixed", "learners": 4},
    "dynamic": {"mode": "dynamic", "learners": 1},
}


@reproduction(
    "dsl",
    claim="dynamic subspace learners reach ≥ 1 unseen-class NMI point above a single metric learner "
    "and within 1 point of the best fixed number of learners, without choosing K (digits 0–4 "
    "seen, 5–9 unseen)",
    metric="unseen-class NMI (mean over seeds)",
    direction="higher",
    baseline="a single metric learner (same attention body, margin loss, schedule)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    arms = ("dynamic", "single") if smoke else tuple(ARMS)
    budget = {"epochs": 3, "finetune_epochs": 1, "patience": 1, "batches_per_epoch": 3} if smoke else {}
    nmi: dict[str, list[float]] = {a: [] for a in arms}
    recall: dict[str, list[float]] = {a: [] for a in arms}
    grown: list[list[int]] = []
    split_epochs: list[list[int]] = []
    best_val_nmi: list[float] = []
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        for arm in arms:
            params = DSLParams(**ARMS[arm], checkpoint_every=0, eval_every=1000, **budget)
            result = train_dsl(InMemoryRunContext(dataset=ds, seed=s), params)
            scores = zero_shot_metrics(embed_all(result.model, result.x_unseen), result.y_unseen.numpy(), s)
            nmi[arm].append(scores["nmi"])
            recall[arm].append(scores["recall_at_1"])
            if arm == "dynamic":
                grown.append([len(idx) for idx in result.model.learners])
                split_epochs.append(result.growth.splits)
                best_val_nmi.append(result.growth.best_nmi)
    mean = {a: float(np.mean(v)) for a, v in nmi.items()}
    fixed = {a: v for a, v in mean.items() if a.startswith("fixed")}
    best_arm = max(fixed, key=fixed.__getitem__) if fixed else "single"
    best_fixed = mean[best_arm]
    ours, base = mean["dynamic"], mean["single"]
    # the claim's other conditions: a mean lead of a point over the single learner, within a point of the best fixed K
    holds = ours >= base + 0.01 and ours >= best_fixed - 0.01
    note = (
        "unseen NMI "
        + ", ".join(f"{a} {v:.3f}" for a, v in mean.items())
        + "; R@1 "
        + ", ".join(f"{a} {np.mean(v):.3f}" for a, v in recall.items())
        + f"; dynamic learner sizes {grown}, split at epochs {split_epochs}, over {len(seeds)} seed(s)"
    )
    if not holds and not smoke:
        if ours < base + 0.01:
            note += "; growing learners did not lift unseen NMI by a point over the single learner here"
        if ours < best_fixed - 0.01:
            epochs = DSLParams().epochs - DSLParams().finetune_epochs
            note += (
                f"; dynamic trails the best fixed K by {best_fixed - ours:.3f}: a split waits for the seen-class "
                f"validation NMI to stall (its best: {np.round(best_val_nmi, 3).tolist()}), so the grown "
                f"learners train for fewer of the {epochs} divide-and-conquer epochs than fixed K, and the Taylor "
                f"rule keeps few neurons, leaving unequal subspaces (sizes above)"
            )
    return Outcome(
        ours=nmi["dynamic"],
        baseline=nmi["single"],
        margin=0.01,  # the claim's margin over the single learner: a point, judged over seeds
        checks=(
            Comparison(
                f"unseen NMI within a point of the best fixed K ({best_arm})",
                nmi["dynamic"],
                nmi[best_arm],
                "higher",
                margin=-0.01,
            ),
        )
        if best_arm != "single"
        else (),
        note=note,
        details={
            "nmi": nmi,
            "recall_at_1": recall,
            "dynamic_learner_sizes": grown,
            "split_epochs": split_epochs,
            "best_val_nmi": best_val_nmi,
        },
    )
