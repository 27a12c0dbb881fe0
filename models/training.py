"""The classification family's shared training loop: tensors from a dataset, SGD epochs, accuracy.

One loop serves every loss (pytorch-metric-learning's lesson): a loss is an `nn.Module` called as
`loss_fn(logits, target, index)` (or, for a `BatchLoss` that needs more than the clean logits,
`loss_fn(model, x, target, index)`) where `index` holds each example's position in the training
split, so a stateful loss (ALDR-KL's per-sample λ table) can key its state by sample. A loss keeps
its state in buffers, which therefore travel in `loss_fn.state_dict()` and in checkpoints.

`fit_classifier` does what every method in the family needs from the run context: metrics and
progress once per epoch, cancellation checked every batch, a checkpoint every `checkpoint_every`
epochs holding everything that decides the rest of the run (weights, optimizer moments, loss
state, the batch-order generator, the epoch history), and resumption from the last checkpoint, so
that a resumed run ends bit-identical to an uninterrupted one with the same seed (and the same
thread count, which `models.context.cpu_threads` pins to the job's CPUs: float reductions depend on
it). A cancelled run raises `Cancelled` from the batch loop; the registry's `invoke` returns cleanly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from models.context import Cancelled, InMemoryRunContext, RunContext
from models.datasets import Dataset
from models.metrics import classification_metrics, reliability_bins
from models.nn.backbones import Classifier, build_backbone
from models.nn.losses import BatchLoss
from models.optim import OptimizerName, build_optimizer
from models.params import EpochTrainingParams, ResumableParams
from models.plots import curves_figure, reliability_figure

EpochMetrics = Callable[[], dict[str, float]]
# An epoch's mini-batches as index tensors into the train split, drawn with the loop's generator (so a resumed
# run draws the same ones): `shuffled_batches` by default, or e.g. `models.episodes.EpisodeSampler`, whose
# batches are N-way K-shot episodes for a loss that needs them.
BatchOrder = Callable[[torch.Tensor, int, torch.Generator], Iterable[torch.Tensor]]


@dataclass
class ClassificationData:
    """A classification dataset as float32/int64 tensors: train (possibly relabelled), val, test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    def to(self, device: str) -> ClassificationData:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return ClassificationData(**moved)


def classification_data(ds: Dataset, train_labels: np.ndarray | None = None) -> ClassificationData:
    """Tensors from an `image-class` or `tabular` dataset.

    Tables are standardised with the train split's mean and standard deviation (uploads come in
    any units); images stay in [0, 1]. `train_labels` replaces the train labels (e.g. noisy ones).
    """
    xs = {s: np.asarray(ds.splits[s]["x"], dtype=np.float32) for s in ("train", "val", "test")}
    if ds.kind == "tabular":
        mean, std = xs["train"].mean(0), xs["train"].std(0) + 1e-6
        xs = {s: (x - mean) / std for s, x in xs.items()}
    ys = {s: np.asarray(ds.splits[s]["y"], dtype=np.int64) for s in ("train", "val", "test")}
    if train_labels is not None:
        ys["train"] = np.asarray(train_labels, dtype=np.int64)
    num_classes = int(ds.meta.get("num_classes") or 1 + max(int(y.max()) for y in ys.values() if y.size))
    tensors = (torch.from_numpy(np.ascontiguousarray(a)) for s in ("train", "val", "test") for a in (xs[s], ys[s]))
    return ClassificationData(*tensors, num_classes=num_classes)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0)
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] (NaN for an empty split)."""
    if len(y) == 0:
        return float("nan")
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()


@dataclass(frozen=True)
class SGDSchedule:
    """SGD with momentum and step decay (÷10 at fractions of the run, the LDR paper's 50/75 of 100)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: Sequence[float] = (0.5, 0.75)
    checkpoint_every: int = 0
    optimizer_name: str = "sgd"  # any name of `models.optim.OPTIMIZERS`; the step decay applies to all

    def lr_at(self, epoch: int) -> float:
        return self.lr * 0.1 ** sum(epoch >= int(round(m * self.epochs)) for m in self.milestones)

    def set_lr(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer_name != "sgd":
            return build_optimizer(self.optimizer_name, model, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class ClassifierTrainingParams(EpochTrainingParams, ResumableParams):
    """The backbone and SGD schedule fields every classification method shares (a method subclasses it,
    overriding a default where its paper differs, e.g. LDR's weight decay)."""

    backbone: Literal["mlp", "cnn"] = Field("mlp", description="MLP on flattened inputs, or a Conv-4 CNN (images)")
    hidden: int = Field(128, ge=8, le=4096, description="MLP width, or CNN channels")
    depth: int = Field(2, ge=1, le=8, description="number of hidden layers of the MLP")
    epochs: int = Field(30, ge=1, le=1000, description="training epochs; the learning rate drops ÷10 at 50% and 75%")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="initial SGD learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="SGD weight decay")
    checkpoint_every: int = Field(10, ge=0, le=1000, description="save a checkpoint every N epochs (0: never)")
    optimizer: OptimizerName = Field(
        "sgd",
        description="optimizer (models/optim): sgd with momentum, or e.g. adamw, "
        "frugal, stable-spam with their defaults and this lr",
    )

    def schedule(self) -> SGDSchedule:
        return SGDSchedule(
            self.epochs,
            self.batch_size,
            self.lr,
            self.momentum,
            self.weight_decay,
            checkpoint_every=self.checkpoint_every,
            optimizer_name=self.optimizer,
        )

    def backbone_for(self, data: ClassificationData) -> Classifier:
        return build_backbone(self.backbone, data.input_shape, data.num_classes, self.hidden, self.depth)


def shuffled_batches(y: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One pass over the train split in a random order drawn from `generator`, `batch_size` at a time."""
    order = torch.randperm(len(y), generator=generator).to(y.device)
    return (order[start : start + batch_size] for start in range(0, len(y), batch_size))


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    should_stop: Callable[[], bool] = lambda: False,
    batches: BatchOrder = shuffled_batches,
) -> float:
    """One epoch of the batches `batches` draws (default: one shuffled pass); the mean training loss per
    example seen. Raises `Cancelled` when `should_stop()` turns true between batches."""
    model.train()
    loss_fn.train()
    total, seen = 0.0, 0
    for index in batches(y, batch_size, generator):
        if should_stop():
            raise Cancelled("training cancelled")
        if isinstance(loss_fn, BatchLoss):  # it runs the model itself (mixup, adversarial examples, ...)
            loss = loss_fn(model, x[index], y[index], index)
        else:
            loss = loss_fn(model(x[index]), y[index], index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
        seen += len(index)
    return total / max(seen, 1)


def _training_state(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loss": loss_fn.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "history": history,
    }


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, list[dict[str, float]]]:
    model.load_state_dict(state["model"])
    loss_fn.load_state_dict(state["loss"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), list(state["history"])


def fit_classifier(
    ctx: RunContext,
    model: nn.Module,
    loss_fn: nn.Module,
    data: ClassificationData,
    schedule: SGDSchedule,
    epoch_metrics: EpochMetrics | None = None,
    batches: BatchOrder = shuffled_batches,
    val_accuracy: Callable[[], float] | None = None,
) -> list[dict[str, float]]:
    """Train `model` on `data.train` with `loss_fn`; the per-epoch history (`Cancelled` when stopped).

    Resumes from `ctx.load_checkpoint()` when there is one. Logs `train_loss`, `val_acc`, `lr`
    (and whatever `epoch_metrics` returns) at step = epoch number. `batches` chooses each epoch's
    mini-batches (episodes for few-shot losses); `val_accuracy` replaces top-1 accuracy of `model(x_val)`
    for a model whose outputs are not class logits (an embedding scored on validation episodes).
    """
    optimizer = schedule.optimizer(model)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = 0, []
    checkpoint = ctx.load_checkpoint()
    if checkpoint is not None:
        start, history = _restore(checkpoint.state, model, loss_fn, optimizer, generator)
        ctx.progress(start, schedule.epochs, f"resumed from the checkpoint at epoch {start}")
    for epoch in range(start, schedule.epochs):
        lr = schedule.set_lr(optimizer, epoch)
        train_loss = train_epoch(
            model,
            loss_fn,
            optimizer,
            data.x_train,
            data.y_train,
            schedule.batch_size,
            generator,
            ctx.cancelled,
            batches,
        )
        val_acc = val_accuracy() if val_accuracy else accuracy(model, data.x_val, data.y_val)
        row = {"train_loss": train_loss, "val_acc": val_acc, "lr": lr, **(epoch_metrics() if epoch_metrics else {})}
        history.append(row)
        ctx.log(epoch + 1, **row)
        ctx.progress(
            epoch + 1, schedule.epochs, f"epoch {epoch + 1}: loss {train_loss:.4f}, val acc {row['val_acc']:.3f}"
        )
        every = schedule.checkpoint_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == schedule.epochs):
            ctx.save_checkpoint(_training_state(model, loss_fn, optimizer, generator, epoch + 1, history), epoch + 1)
    return history


class HelperRunContext(InMemoryRunContext):
    """A private in-memory context for a helper run inside a method or a reproduction (a teacher, a pre-trained
    backbone, one arm of a comparison): its metrics and checkpoints stay in this object, but a loop running
    under it stops, raising `Cancelled`, as soon as `parent` (the job) is cancelled."""

    def __init__(self, parent: RunContext | None, seed: int, dataset: Dataset | None = None):
        super().__init__(dataset=dataset, seed=seed)
        self.parent = parent

    def cancelled(self) -> bool:
        return super().cancelled() or (self.parent is not None and self.parent.cancelled())


@dataclass
class TrainedClassifier:
    model: nn.Module
    data: ClassificationData
    history: list[dict[str, float]]


def fit_calibrated(
    ctx: RunContext,
    params: ClassifierTrainingParams,
    make_loss: Callable[[ClassificationData], nn.Module],
    method_id: str,
    make_model: Callable[[ClassificationData], nn.Module] | None = None,
) -> TrainedClassifier:
    """The family's usual run: tensors from `ctx.dataset`, the params' backbone (or `make_model(data)`) seeded
    by `ctx.seed`, the loss `make_loss(data)`, `fit_classifier` logging validation ECE and NLL each epoch."""
    ds = ctx.dataset
    if ds is None or ds.kind not in ("image-class", "tabular"):
        raise ValueError(f"{method_id} needs an 'image-class' or 'tabular' classification dataset")
    data = classification_data(ds).to(ctx.device)
    torch.manual_seed(ctx.seed)
    model = (make_model(data) if make_model else params.backbone_for(data)).to(ctx.device)
    loss_fn = make_loss(data).to(ctx.device)

    def val_calibration() -> dict[str, float]:
        m = classification_metrics(predict_logits(model, data.x_val), data.y_val)
        return {"val_ece": m["ece"], "val_nll": m["nll"]}

    history = fit_classifier(ctx, model, loss_fn, data, params.schedule(), val_calibration)
    return TrainedClassifier(model, data, history)


def save_training_plots(ctx: RunContext, name: str, trained: TrainedClassifier) -> None:
    """`curves.png` (train loss, val accuracy, val ECE per epoch) and `reliability.png` (test split)."""
    epochs = list(range(1, len(trained.history) + 1))
    panels = {k: {name: (epochs, [row[k] for row in trained.history])} for k in ("train_loss", "val_acc", "val_ece")}
    ctx.save_artifact("curves.png", curves_figure(panels, "epoch", title=name), kind="plot")
    bins = reliability_bins(predict_logits(trained.model, trained.data.x_test), trained.data.y_test)
    ctx.save_artifact("reliability.png", reliability_figure({name: bins}), kind="plot")
