"""One self-supervised training loop for the representation family (SimCLR and its variants).

A method supplies an `objective(model, view1, view2, labels, generator) -> loss` (everything it
learns — heads, temperature networks, gates — lives in `model`; `labels` are the batch's labels
when the method is given any, for supervised variants; `generator` is the run's one seeded
generator, for any sampling the objective does); the loop draws two views per image with it, steps
Adam, and does the RunContext chores: metrics and progress per epoch,
cancellation checked every batch, checkpoints every `checkpoint_every` epochs (saved before the
epoch's progress report, so a run stopped at that report resumes from that epoch) holding all that
decides the rest of the run (weights, optimizer moments, the generator, the history), and
resumption from the last one, so a resumed run ends identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.context import RunContext, stop_if_cancelled
from models.representation.augment import ViewRecipe, random_view
from models.representation.losses import nt_xent

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class ContrastiveSchedule:
    epochs: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    checkpoint_every: int = 0

    @classmethod
    def of(cls, params: Any) -> ContrastiveSchedule:
        """The schedule a job's params give (`models.representation.job.RepresentationParams`' fields)."""
        return cls(params.epochs, params.batch_size, params.lr, params.weight_decay, params.checkpoint_every)


def simclr_objective(temperature: float) -> Objective:
    """SimCLR: NT-Xent on the first projection head's outputs of the two views."""
    return lambda model, v1, v2, labels, generator: nt_xent(model(v1)[0], model(v2)[0], temperature)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    """Everything that decides the rest of a run: weights, optimizer moments, the generator, the history."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "history": history,
    }


def resume(
    ctx: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, list[dict[str, float]]]:
    """Load the last checkpoint into the training objects; (step reached, history), or (0, []) if none."""
    checkpoint = ctx.load_checkpoint()
    if checkpoint is None:
        return 0, []
    state = checkpoint.state
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["step"]), list(state["history"])


def fit_contrastive(
    ctx: RunContext,
    model: nn.Module,
    objective: Objective,
    x: torch.Tensor,
    recipe: ViewRecipe,
    schedule: ContrastiveSchedule,
    epoch_metrics: Callable[[], dict[str, float]] | None = None,
    labels: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Train on the images `x` ([N, C, H, W]); the per-epoch history (`Cancelled` when cancelled)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = resume(ctx, model, optimizer, generator)
    if start:
        ctx.progress(start, schedule.epochs, f"resumed from the checkpoint at epoch {start}")
    model.train()
    for epoch in range(start, schedule.epochs):
        order = torch.randperm(len(x), generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, len(x) - 1, schedule.batch_size):  # a batch of 1 has no negatives
            stop_if_cancelled(ctx)
            index = order[begin : begin + schedule.batch_size]
            if len(index) < 2:
                continue
            v1, v2 = (random_view(x[index], recipe, generator).to(ctx.device) for _ in range(2))
            y = None if labels is None else labels[index].to(ctx.device)
            loss = objective(model, v1, v2, y, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(index), seen + len(index)
        row = {"train_loss": total / max(seen, 1), **(epoch_metrics() if epoch_metrics else {})}
        history.append(row)
        ctx.log(epoch + 1, **row)
        every = schedule.checkpoint_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == schedule.epochs):
            ctx.save_checkpoint(training_state(model, optimizer, generator, epoch + 1, history), epoch + 1)
        ctx.progress(epoch + 1, schedule.epochs, f"epoch {epoch + 1}: loss {row['train_loss']:.4f}")
    return history
