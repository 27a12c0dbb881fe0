"""Fitting an HCLT: Chow–Liu structure, then mini-batch EM epochs, with the run's progress, cancel checks and
resumable checkpoints; and the HCLT as a registered model folder (safetensors + its tree in JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.compression.chow_liu import RootedTree
from models.compression.hclt import HCLT
from models.context import RunContext, stop_if_cancelled


@dataclass(frozen=True)
class EMSchedule:
    """Mini-batch EM: `epochs` passes in batches of `batch_size`, step η = `step_size`; `pseudocount` is the
    total smoothing mass per parameter row over the whole training set (each batch adds its share)."""

    epochs: int = 40
    batch_size: int = 256
    step_size: float = 0.2
    pseudocount: float = 1.0


def em_epoch(hclt: HCLT, train: torch.Tensor, schedule: EMSchedule, seed: int, epoch: int) -> float:
    """One pass in a batch order fixed by (seed, epoch), so a resumed run repeats it; returns the epoch's
    mean training bits per dimension (each batch's, before its update)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    total = 0.0
    for batch in order.split(schedule.batch_size):
        share = len(batch) / len(train)
        total += hclt.em_step(train[batch], schedule.step_size, schedule.pseudocount * share)
    return -total / train.numel() / math.log(2)


def fit_hclt(
    ctx: RunContext,
    hclt: HCLT,
    train: torch.Tensor,
    schedule: EMSchedule,
    seed: int,
    start_epoch: int = 0,
    after_epoch: Callable[[int, float], None] | None = None,
) -> HCLT:
    """EM epochs start_epoch..epochs−1 on `hclt` (in place), reporting progress; `after_epoch(epoch, bpd)`
    runs after each (logging, checkpoints)."""
    for epoch in range(start_epoch, schedule.epochs):
        stop_if_cancelled(ctx)
        ctx.progress(epoch, schedule.epochs, f"EM: epoch {epoch + 1}/{schedule.epochs}")
        bpd = em_epoch(hclt, train, schedule, seed, epoch)
        if after_epoch is not None:
            after_epoch(epoch, bpd)
    return hclt


def save_hclt(hclt: HCLT, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hclt.parameters().items()}, str(folder / "hclt.safetensors"))
    (folder / "tree.json").write_text(json.dumps({"parents": list(hclt.tree.parents)}))
    return folder


def load_hclt(folder: Path) -> HCLT:
    tensors = load_file(str(folder / "hclt.safetensors"))
    tree = RootedTree(tuple(json.loads((folder / "tree.json").read_text())["parents"]))
    return HCLT(tree, tensors["log_root"], tensors["log_trans"], tensors["log_emit"])
