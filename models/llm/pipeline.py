"""The compression chain of `crucible demo llm`: base → SparseGPT prune + SquareHead → EoRA, each registered.

The chain is written down once, here, as the params of its two jobs (`squarehead_params`,
`eora_params`); the HTTP demo submits them as jobs and `compress_pipeline` runs them in-process
through the registry (a notebook or a test drives the same jobs the service runs, and this kit never
imports a method module). Every stage's held-out perplexity is read back from the registered
folder's lineage: the one-shot pruned model's from the SquareHead job, which measures it before
fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.context import RunContext
from models.llm.base import base_model, base_model_name
from models.llm.folder import read_lineage
from models.registry import get_method

# The compression jobs' calibration/evaluation windows; the same for every stage so perplexities compare.
WINDOWS = {
    True: {"calibration_windows": 4, "seq_len": 32, "eval_windows": 4},
    False: {"calibration_windows": 32, "seq_len": 128, "eval_windows": 32},
}
SQUAREHEAD = {True: {"steps": 3, "batch_size": 2, "train_tokens": 2000}, False: {"steps": 100, "batch_size": 4}}
EORA_RANK = {True: 4, False: 8}


@dataclass(frozen=True)
class Stage:
    name: str
    ref: str  # the registered model ("" for the one-shot pruned model, measured but not registered)
    val_ppl: float


def squarehead_params(
    base_ref: str, smoke: bool, sparsity: str = "0.5", steps: int | None = None, output_name: str = ""
) -> dict[str, Any]:
    """Prune `base_ref` with SparseGPT and fine-tune it with the SquareHead objective."""
    tuning = dict(SQUAREHEAD[smoke]) | ({"steps": steps} if steps is not None else {})
    return {
        "model": base_ref,
        "sparsity": sparsity,
        "objective": "squarehead",
        "checkpoint_every": 0,
        "output_name": output_name,
        **WINDOWS[smoke],
        **tuning,
    }


def eora_params(
    base_ref: str, compressed_ref: str, smoke: bool, rank: int | None = None, output_name: str = ""
) -> dict[str, Any]:
    """Compensate `compressed_ref` with EoRA against its dense parent `base_ref`."""
    return {
        "model": base_ref,
        "compressed_model": compressed_ref,
        "rank": rank if rank is not None else EORA_RANK[smoke],
        "compensation": "eora",
        "output_name": output_name,
        **WINDOWS[smoke],
    }


def compress_pipeline(
    ctx: RunContext, smoke: bool = False, sparsity: str = "0.5", rank: int | None = None, steps: int | None = None
) -> list[Stage]:
    """Run the chain and return its stages (dense, pruned, SquareHead-tuned, EoRA-compensated) in order."""
    base_ref = base_model_name(smoke)
    base_lineage = read_lineage(base_model(ctx, smoke))
    tuned, compensated = f"{base_ref}-squarehead", f"{base_ref}-squarehead-eora"
    get_method("squarehead").invoke(ctx, squarehead_params(base_ref, smoke, sparsity, steps, output_name=tuned))
    get_method("eora").invoke(ctx, eora_params(base_ref, tuned, smoke, rank, output_name=compensated))
    tuned_metrics = read_lineage(ctx.load_model(tuned)).get("metrics", {})
    eora_metrics = read_lineage(ctx.load_model(compensated)).get("metrics", {})
    nan = float("nan")
    return [
        Stage("dense", base_ref, float(base_lineage.get("val_ppl", nan))),
        Stage("pruned", "", float(tuned_metrics.get("val_ppl_oneshot", nan))),
        Stage("squarehead", tuned, float(tuned_metrics.get("val_ppl", nan))),
        Stage("eora", compensated, float(eora_metrics.get("val_ppl", nan))),
    ]
