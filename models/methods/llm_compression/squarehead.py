"""SquareHead: sparse fine-tuning with per-layer normalised feature distillation (Kurtic et al., "Sparse
Finetuning for Inference Acceleration of Large Language Models", 2023).

The student starts as the one-shot SparseGPT-pruned teacher (unstructured s or N:M, the shared
toolkit's `sparsegpt`); its masks stay fixed and are re-applied after every optimizer step. It is
then fine-tuned with L = h_CE·CE + h_KL·KL(p_t‖p_s) + h_SQ·Σ_l mean((h_s^l − h_t^l)²)/mean((h_t^l)²)
over the outputs of every decoder block (Eq. 1; `models/llm/distillation.py`). The paper's point is
that at high sparsity CE alone over-fits the little fine-tuning data and even logit KL gives too
weak a signal, while matching every block's features, each normalised by its own energy so no layer
dominates, recovers the dense model best. Defaults follow the reference (IST-DASLab/SparseFinetuning,
`train_sparse.py`): h_CE = h_SQ = 1, h_KL = 0, and the paper's learning rate for 60%/80%/N:M (1e-4); the
step count is rescaled for a 1.3M-parameter model and a few CPU minutes (the paper runs epochs of data).
"""

from __future__ import annotations

import copy
import time
from typing import Literal

from pydantic import Field

from models.context import InMemoryRunContext, RunContext, cpu_threads
from models.datasets import load_builtin
from models.llm.compression.job import CompressionParams, load_parent, model_stem, register_compressed, token_sets
from models.llm.compression.oneshot import prune_model
from models.llm.compression.pruning import SPARSITY_PATTERN, PruneMethod, SparsityPattern
from models.llm.compression.storage import LinearFormat, packed_bytes
from models.llm.data import sampled_stream
from models.llm.distillation import FinetuneSchedule, LossWeights, finetune
from models.llm.evaluation import perplexity
from models.llm.folder import CausalLM
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction

Objective = Literal["squarehead", "ce", "kl"]
OBJECTIVES: dict[str, LossWeights] = {
    "squarehead": LossWeights(1.0, 0.0, 1.0),
    "ce": LossWeights(1.0, 0.0, 0.0),
    "kl": LossWeights(0.0, 1.0, 0.0),
}


class SquareHeadParams(CompressionParams):
    sparsity: str = Field("0.5", pattern=SPARSITY_PATTERN, description="a fraction like 0.7, or N:M like 2:4")
    prune_method: PruneMethod = Field("sparsegpt", description="one-shot pruning that initialises the student")
    objective: Objective = Field(
        "squarehead",
        description="squarehead (CE + normalised feature MSE, the paper), "
        "or the baselines ce (CE only) and kl (logit KL only)",
    )
    steps: int = Field(150, ge=0, le=100_000, description="fine-tuning steps (0: one-shot pruning only)")
    batch_size: int = Field(4, ge=1, le=512, description="windows per step")
    lr: float = Field(
        1e-4,
        gt=0.0,
        le=1.0,
        description="peak AdamW learning rate (linear warm-up and decay); the paper's for 60%, 80% and N:M",
    )
    train_tokens: int = Field(
        200_000, ge=1000, description="fine-tuning tokens sampled from the train split's documents"
    )
    checkpoint_every: int = Field(50, ge=0, description="save a checkpoint every N steps (0: never)")


def sparse_finetune(
    ctx: RunContext,
    teacher: CausalLM,
    params: SquareHeadParams,
    student: CausalLM | None = None,
    masks: dict | None = None,
) -> tuple[CausalLM, dict, dict[str, float]] | None:
    """Prune (unless a pruned student and masks are given) and fine-tune; (student, masks, metrics) or None."""
    sets = token_sets(ctx, teacher, params)
    pattern = SparsityPattern.parse(params.sparsity)
    if student is None:
        student = CausalLM(copy.deepcopy(teacher.model), teacher.tokenizer, teacher.path)
        masks = prune_model(student.model, sets.calibration, pattern, params.prune_method)
    metrics = {
        "val_ppl_parent": perplexity(teacher.model, sets.evaluation),
        "val_ppl_oneshot": perplexity(student.model, sets.evaluation),
    }
    if params.steps:
        ds = (
            ctx.dataset
            if ctx.dataset is not None and ctx.dataset.kind == "text-corpus"
            else load_builtin("stdlib-code")
        )
        stream = sampled_stream(teacher.tokenizer, ds.train["text"], params.train_tokens)
        schedule = FinetuneSchedule(
            params.steps,
            params.batch_size,
            sets.calibration.shape[1],
            params.lr,
            warmup_steps=min(10, params.steps),
            checkpoint_every=params.checkpoint_every,
        )
        if finetune(ctx, student.model, teacher.model, stream, OBJECTIVES[params.objective], masks, schedule) is None:
            return None
    metrics["val_ppl"] = perplexity(student.model, sets.evaluation)
    metrics["packed_bytes"] = packed_bytes(student.model, {n: LinearFormat(pattern=pattern) for n in masks})
    metrics["packed_bytes_parent"] = packed_bytes(teacher.model, {})
    return student, masks, metrics


@method(
    "squarehead",
    family="llm-compression",
    task="compress",
    datasets=("text-corpus",),
    params=SquareHeadParams,
    paper="Sparse Finetuning for Inference Acceleration of Large Language Models",
)
def run(ctx: RunContext, params: SquareHeadParams) -> None:
    """Prune an LLM one-shot with SparseGPT, then fine-tune it with SquareHead distillation (masks fixed)."""
    with cpu_threads(ctx.resources):
        parent = load_parent(ctx, params.model)
        result = sparse_finetune(ctx, parent.lm, params)
    if result is None:
        return
    student, masks, metrics = result
    ctx.log(params.steps, **metrics)
    name = (
        params.output_name or f"{model_stem(parent.ref)}-{params.objective}-{str(params.sparsity).replace(':', 'of')}"
    )
    ref = register_compressed(
        ctx,
        student,
        parent.ref,
        "squarehead",
        params,
        metrics,
        name,
        {"sparsity": params.sparsity, "pruned_linears": len(masks)},
    )
    ctx.progress(
        params.steps,
        max(params.steps, 1),
        f"registered {ref}: val ppl {metrics['val_ppl_oneshot']:.2f} one-shot → {metrics['val_ppl']:.2f}",
    )


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "squarehead",
    claim="SquareHead recovers a pruned model where CE fails: val ppl SquareHead < KL < CE at "
    "70% unstructured and 2:4 sparsity (same SparseGPT start, steps and data)",
    metric="val perplexity after sparse fine-tuning (mean of 70% and 2:4)",
    direction="lower",
    baseline="CE-only fine-tuning",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per sparsity: one SparseGPT student, fine-tuned three times (CE, KL, SquareHead) for the same steps."""
    start = time.perf_counter()
    base = (
        {"calibration_windows": 4, "seq_len": 32, "eval_windows": 4, "steps": 3, "batch_size": 2, "train_tokens": 2000}
        if smoke
        else {
            "calibration_windows": 32,
            "seq_len": 128,
            "eval_windows": 32,
            "steps": 100,
            "batch_size": 4,
            "train_tokens": 200_000,
        }
    )
    sparsities = ("2:4",) if smoke else ("0.7", "2:4")
    table: dict[str, dict[str, float]] = {}
    with cpu_threads(ctx.resources):
        teacher = load_parent(ctx, "", smoke).lm
        for sparsity in sparsities:
            pruned = None
            for objective in ("ce", "kl", "squarehead"):
                params = SquareHeadParams(sparsity=sparsity, objective=objective, checkpoint_every=0, **base)
                inner = InMemoryRunContext(seed=seed, resources=ctx.resources)
                if pruned is None:
                    oneshot = sparse_finetune(inner, teacher, params.model_copy(update={"steps": 0}))
                    assert oneshot is not None
                    pruned, masks, metrics = oneshot
                    table[sparsity] = {"dense": metrics["val_ppl_parent"], "one-shot": metrics["val_ppl"]}
                student = CausalLM(copy.deepcopy(pruned.model), teacher.tokenizer, teacher.path)
                result = sparse_finetune(inner, teacher, params, student, masks)
                assert result is not None
                table[sparsity][objective] = result[2]["val_ppl"]
                ctx.progress(
                    len(table) * 3 - 3 + ("ce", "kl", "squarehead").index(objective) + 1,
                    3 * len(sparsities),
                    f"{sparsity}: {objective}",
                )
    claimed = [s for s in sparsities if s in ("0.7", "2:4")]
    ordered = {s: table[s]["squarehead"] < table[s]["kl"] < table[s]["ce"] for s in claimed}
    ours = sum(table[s]["squarehead"] for s in claimed) / len(claimed)
    ce = sum(table[s]["ce"] for s in claimed) / len(claimed)
    kinds = ("one-shot", "ce", "kl", "squarehead")
    ctx.save_artifact(
        "squarehead_recovery.png",
        curves_figure(
            {f"val ppl, sparsity {s}": {k: ([0], [table[s][k]]) for k in kinds} for s in sparsities}, "", ncols=3
        ),
        kind="plot",
    )
    note = (
        f"ordering SquareHead < KL < CE holds at {[s for s, ok in ordered.items() if ok]} of {claimed}; "
        f"{base['steps']} steps of {base['batch_size']}×{base['seq_len']} tokens per run; one seed "
        f"({time.perf_counter() - start:.0f}s)"
    )
    return Outcome(
        ours=ours,
        baseline=ce,
        seeds=1,
        holds=all(ordered.values()),
        note=note,
        details={"ppl": table, "ordered": ordered},
    )
