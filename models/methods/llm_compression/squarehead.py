"""SquareHead: sparse fine-tuning with per-layer normalised feature distillation.

Paper: Eldar Kurtic, Denis Kuznedelev, Elias Frantar, Michael Goin and Dan Alistarh, "Sparse Finetuning for
Inference Acceleration of Large Language Models", arXiv:2310.06927 (2023). Reference code:
https://github.com/IST-DASLab/SparseFinetuning (`scripts/train/train_sparse.py`, class
`KnowledgeDistillation`; `scripts/train/scripts/mpt/run_sparse_finetune.sh` for the loss weights).

The student starts as the one-shot SparseGPT-pruned teacher (unstructured s or N:M, the shared toolkit's
`sparsegpt`); its masks stay fixed and are re-applied after every optimizer step. It is then fine-tuned with

    L = h_CE·CE + h_KL·KL(p_t ‖ p_s) + h_SQ·Σ_l mean((h_s^l − h_t^l)²) / mean((h_t^l)²)      (Eq. 1)

(`models/llm/distillation.py`). The paper's point is that at high sparsity CE alone over-fits the little
fine-tuning data and even logit KL gives too weak a signal, while matching hidden features layer by
layer, each term normalised by the teacher's feature energy so no layer dominates, recovers the dense
model best. The layers l are the hidden states the model returns after the embeddings, exactly the ones
the reference takes (`hidden_states[1:]`): for a Llama of L blocks in transformers 5, the outputs of
blocks 1 … L−1 and, last, the final-RMSNorm'd output of block L (what the LM head reads, which HF returns
in place of block L's raw output; the reference's MPT does the same). Every token of the windows counts
(the reference skips padding; our windows have none).

Defaults follow the reference: h_CE = h_SQ = 1, h_KL = 0, and the learning rate it gives for 60%, 80% and
N:M sparsity (1e-4; 3e-5 for ≤50%, 8e-5 for 70%) with AdamW. The step count (150 steps of 4 windows of 256
tokens) is rescaled for the 1.3M-parameter base model and a few CPU minutes (the paper runs 2–4 epochs of
task data at batch 32), and the schedule is a linear warm-up over 10 steps then a linear decay to zero
(ours; the reference warms up for 20 batches). The reproduction
fine-tunes the same SparseGPT student with CE only, KL only and SquareHead on the same sampled train
tokens, at 70% unstructured and 2:4 sparsity (the paper's high-sparsity regime); the data are stdlib code
rather than a task's instructions.
"""

from __future__ import annotations

import copy
import statistics
from typing import Literal

from pydantic import Field

from models.context import InMemoryRunContext, RunContext
from models.datasets import load_builtin
from models.llm.base import base_model_name
from models.llm.compression.job import (
    CompressionTuningParams,
    load_parent,
    model_stem,
    parent_model_field,
    register_compressed,
    token_sets,
)
from models.llm.compression.oneshot import prune_model
from models.llm.compression.pruning import SPARSITY_PATTERN, PruneMethod, SparsityPattern
from models.llm.compression.storage import LinearFormat, packed_bytes
from models.llm.data import sampled_stream
from models.llm.distillation import FinetuneSchedule, LossWeights, finetune
from models.llm.evaluation import perplexity
from models.llm.folder import CausalLM
from models.params import ResumableParams
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

Objective = Literal["squarehead", "ce", "kl"]
OBJECTIVES: dict[str, LossWeights] = {
    "squarehead": LossWeights(1.0, 0.0, 1.0),
    "ce": LossWeights(1.0, 0.0, 0.0),
    "kl": LossWeights(0.0, 1.0, 0.0),
}


class SquareHeadParams(CompressionTuningParams, ResumableParams):
    # one-shot pruning and hidden-state distillation walk any decoder stack (GPT-NeoX, GPT-2 included)
    model: str = parent_model_field("decoder-stack")
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
) -> tuple[CausalLM, dict, dict[str, float]]:
    """Prune (unless a pruned student and masks are given) and fine-tune; (student, masks, metrics)."""
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
            weight_decay=params.weight_decay,
        )
        finetune(ctx, student.model, teacher.model, stream, OBJECTIVES[params.objective], masks, schedule)
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
    tiny={
        "model": base_model_name(smoke=True),
        "calibration_windows": 2,
        "seq_len": 16,
        "eval_windows": 2,
        "steps": 3,
        "batch_size": 2,
        "train_tokens": 2000,
        "checkpoint_every": 0,
    },
)
def run(ctx: RunContext, params: SquareHeadParams) -> None:
    """Prune an LLM one-shot with SparseGPT, then fine-tune it with SquareHead distillation (masks fixed)."""
    parent = load_parent(ctx, params.model)
    student, masks, metrics = sparse_finetune(ctx, parent.lm, params)
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


ORDER: tuple[Objective, ...] = ("ce", "kl", "squarehead")


@reproduction(
    "squarehead",
    claim="SquareHead recovers a pruned model where CE fails: val ppl SquareHead < KL < CE at "
    "70% unstructured and 2:4 sparsity (same SparseGPT start, steps and data)",
    metric="val perplexity after sparse fine-tuning (mean of 70% and 2:4)",
    direction="lower",
    baseline="CE-only fine-tuning",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per sparsity one SparseGPT student (deterministic), fine-tuned per seed three times (CE, KL, SquareHead) for
    the same steps on the same data; the seed draws the fine-tuning batches."""
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
    seeds = seeds_for(seed, smoke)
    teacher = load_parent(ctx, "", smoke).lm
    pruned: dict[str, tuple[CausalLM, dict]] = {}
    oneshot: dict[str, dict[str, float]] = {}
    per_seed: list[dict[str, dict[str, float]]] = [{s: {} for s in sparsities} for _ in seeds]
    runs = [(i, sparsity, objective) for i in range(len(seeds)) for sparsity in sparsities for objective in ORDER]
    loop = sweep(ctx, runs, label=lambda item: f"seed {seeds[item[0]]}, sparsity {item[1]}: {item[2]}")
    for i, sparsity, objective in loop:
        params = SquareHeadParams(sparsity=sparsity, objective=objective, checkpoint_every=0, **base)
        inner = InMemoryRunContext(seed=seeds[i], resources=ctx.resources)
        if sparsity not in pruned:
            student, masks, metrics = sparse_finetune(inner, teacher, params.model_copy(update={"steps": 0}))
            pruned[sparsity] = (student, masks)
            oneshot[sparsity] = {"dense": metrics["val_ppl_parent"], "one-shot": metrics["val_ppl"]}
        student, masks = pruned[sparsity]
        copy_of = CausalLM(copy.deepcopy(student.model), teacher.tokenizer, teacher.path)
        per_seed[i][sparsity][objective] = sparse_finetune(inner, teacher, params, copy_of, masks)[2]["val_ppl"]
    table = {s: oneshot[s] | {o: statistics.fmean(t[s][o] for t in per_seed) for o in ORDER} for s in sparsities}
    ordered = {s: table[s]["squarehead"] < table[s]["kl"] < table[s]["ce"] for s in sparsities}
    kinds = ("one-shot", "ce", "kl", "squarehead")
    ctx.save_artifact(
        "squarehead_recovery.png",
        curves_figure(
            {f"val ppl, sparsity {s}": {k: ([0], [table[s][k]]) for k in kinds} for s in sparsities}, "", ncols=3
        ),
        kind="plot",
    )
    note = (
        f"ordering SquareHead < KL < CE (means over seeds) holds at {[s for s, ok in ordered.items() if ok]} of "
        f"{list(sparsities)}; {base['steps']} steps of {base['batch_size']}×{base['seq_len']} tokens per run, "
        f"{len(seeds)} seed(s) ({sum(loop.seconds.values()):.0f}s)"
    )
    return Outcome(
        ours=[statistics.fmean(t[s]["squarehead"] for s in sparsities) for t in per_seed],
        baseline=[statistics.fmean(t[s]["ce"] for s in sparsities) for t in per_seed],
        holds=all(ordered.values()),
        note=note,
        details={"ppl": table, "ppl_per_seed": per_seed, "ordered": ordered},
    )
