"""The compression chain of `crucible demo llm`: base → one-shot prune → SquareHead → EoRA, each a registered model.

A plain function over a run context so the CLI demo, a notebook or a test drives the same jobs the service
runs: each stage is the method's own `run` (registering its model with lineage to the previous one), and
every stage's held-out perplexity is read back from the registered folder's lineage file.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.context import RunContext
from models.llm.base import base_model, base_model_name
from models.llm.folder import read_lineage
from models.methods.llm_compression import eora, squarehead


@dataclass(frozen=True)
class Stage:
    name: str
    ref: str
    val_ppl: float


def compress_pipeline(
    ctx: RunContext, smoke: bool = False, sparsity: str = "0.5", rank: int = 8, steps: int | None = None
) -> list[Stage]:
    """Run the chain and return its stages (dense, pruned, SquareHead-tuned, EoRA-compensated) in order."""
    base_ref = base_model_name(smoke)
    base_lineage = read_lineage(base_model(ctx, smoke))
    sizes = {"calibration_windows": 4, "seq_len": 32, "eval_windows": 4} if smoke else {}
    stages = [Stage("dense", base_ref, float(base_lineage.get("val_ppl", float("nan"))))]
    tuned_steps = steps if steps is not None else (3 if smoke else 100)
    pruned, tuned = f"{base_ref}-pruned", f"{base_ref}-squarehead"
    squarehead.run(
        ctx,
        squarehead.SquareHeadParams(
            model=base_ref, sparsity=sparsity, steps=0, output_name=pruned, checkpoint_every=0, **sizes
        ),
    )
    squarehead.run(
        ctx,
        squarehead.SquareHeadParams(
            model=base_ref,
            sparsity=sparsity,
            steps=tuned_steps,
            output_name=tuned,
            checkpoint_every=0,
            **({"batch_size": 2, "train_tokens": 2000} if smoke else {}),
            **sizes,
        ),
    )
    compensated = f"{base_ref}-squarehead-eora"
    eora.run(ctx, eora.EoRAParams(model=base_ref, compressed_model=tuned, rank=rank, output_name=compensated, **sizes))
    for label, name, key in (
        ("pruned", pruned, "val_ppl"),
        ("squarehead", tuned, "val_ppl"),
        ("eora", compensated, "val_ppl"),
    ):
        metrics = read_lineage(ctx.load_model(name)).get("metrics", {})
        stages.append(Stage(label, name, float(metrics.get(key, float("nan")))))
    return stages
