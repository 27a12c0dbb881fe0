"""The llm-training family's shared loop: pre-train a fresh tiny Llama on code with any named optimizer.

FRUGAL, Stable-SPAM and SST are claims about *pre-training* (from random initialisation) under an
optimizer or parametrisation, so their jobs and reproductions share one loop: a byte-level BPE
tokenizer trained on the first documents of the corpus, a packed token stream, a
`LlamaForCausalLM` from `models/llm/model.py`, random windows from a seeded generator, linear
warm-up then cosine decay, and per step the training loss, the global gradient norm (before any
clipping: Stable-SPAM's spike statistics), the wall time and the optimizer's state bytes. A run
that produces a non-finite loss, or a loss far above its start, is marked diverged and stopped.

The corpus is cut to `max_documents` files and the vocabulary to `vocab_size` so that a run of a few
hundred steps fits in a CPU minute; the same settings for every arm of a comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.context import RunContext, stop_if_cancelled
from models.datasets import Dataset, load_builtin
from models.llm.data import fixed_windows, random_windows, token_stream
from models.llm.evaluation import mean_nll
from models.llm.folder import save_folder
from models.llm.model import SizeName, build_model, llama_config
from models.llm.pretraining import lr_at
from models.llm.tokenizer import train_tokenizer
from models.optim import optimizer_state_bytes
from models.params import StepTrainingParams
from models.plots import curves_figure

DIVERGENCE_NATS = 2.0  # a loss this far above the initial loss (or non-finite) ends the run as diverged


class LMTrainingParams(StepTrainingParams):
    """What every pre-training comparison in the family shares (a method subclasses it)."""

    size: SizeName = Field("micro", description="tiny Llama size (models/llm/model.py)")
    vocab_size: int = Field(512, ge=300, le=65536, description="BPE vocabulary trained on the corpus")
    max_documents: int = Field(60, ge=1, description="corpus files used for the tokenizer and the train stream")
    batch_size: int = Field(16, ge=1, le=1024, description="windows per step")
    seq_len: int = Field(64, ge=8, le=4096, description="tokens per window")
    lr: float = Field(2e-3, gt=0.0, le=1.0, description="peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up, then cosine decay to 10%")
    grad_clip: float = Field(0.0, ge=0.0, description="global gradient-norm clip (0: none)")
    eval_windows: int = Field(16, ge=1, le=4096, description="held-out windows for the final perplexity")


@dataclass
class CodeCorpus:
    tokenizer: PreTrainedTokenizerFast
    train_stream: torch.Tensor
    val_windows: torch.Tensor


@dataclass
class LMRun:
    """What one pre-training run measured."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    state_bytes: int = 0
    val_loss: float = float("nan")
    diverged: bool = False

    @property
    def val_ppl(self) -> float:
        return math.exp(min(self.val_loss, 700.0))

    def grad_norm_quantile(self, q: float) -> float:
        return float(np.quantile(self.grad_norms, q)) if self.grad_norms else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "val_loss": self.val_loss,
            "val_ppl": self.val_ppl,
            "state_bytes": float(self.state_bytes),
            "final_train_loss": float(np.mean(self.losses[-10:])) if self.losses else float("nan"),
            "grad_norm_p99": self.grad_norm_quantile(0.99),
            "diverged": float(self.diverged),
            "step_seconds": float(np.median(self.step_seconds)) if self.step_seconds else float("nan"),
        }


def code_corpus(dataset: Dataset, params: LMTrainingParams) -> CodeCorpus:
    """Tokenizer, train stream and fixed validation windows for a `text-corpus` dataset."""
    if dataset.kind != "text-corpus":
        raise ValueError("this job needs a 'text-corpus' dataset such as stdlib-code")
    return _corpus(dataset, params.vocab_size, params.max_documents, params.seq_len, params.eval_windows)


def _corpus(dataset: Dataset, vocab_size: int, max_documents: int, seq_len: int, eval_windows: int) -> CodeCorpus:
    train = list(dataset.splits["train"]["text"])[:max_documents]
    tokenizer = train_tokenizer(train, vocab_size)
    val = fixed_windows(
        token_stream(tokenizer, list(dataset.splits["val"]["text"]), max_tokens=seq_len * eval_windows),
        seq_len,
        eval_windows,
    )
    return CodeCorpus(tokenizer, token_stream(tokenizer, train), val)


@lru_cache(maxsize=4)
def _builtin_corpus(vocab_size: int, max_documents: int, seq_len: int, eval_windows: int) -> CodeCorpus:
    return _corpus(load_builtin("stdlib-code"), vocab_size, max_documents, seq_len, eval_windows)


def builtin_code_corpus(params: LMTrainingParams) -> CodeCorpus:
    """`code_corpus` on the built-in `stdlib-code`, cached: every arm of a reproduction shares it."""
    return _builtin_corpus(params.vocab_size, params.max_documents, params.seq_len, params.eval_windows)


def fresh_llama(corpus: CodeCorpus, params: LMTrainingParams, seed: int) -> LlamaForCausalLM:
    tok = corpus.tokenizer
    return build_model(
        llama_config(params.size, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), seed
    )


def lr_factor(step: int, params: LMTrainingParams) -> float:
    """lm-pretrain's schedule as a multiplier: linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    return lr_at(step, params) / params.lr  # lr_at reads only lr, warmup_steps and steps


def global_grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def train_lm(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: CodeCorpus,
    params: LMTrainingParams,
    seed: int,
    ctx: RunContext | None = None,
    after_step: Callable[[int], None] | None = None,
) -> LMRun:
    """Pre-train `model` with `optimizer` (its groups' `lr` is the peak rate); `Cancelled` when `ctx` is.

    `after_step(step)` runs after each optimizer step (SST's periodic re-SVD hooks in there).
    """
    peak = [g["lr"] for g in optimizer.param_groups]
    report_every = max(1, min(25, params.steps // 10))  # a short run reports before its end too
    generator = torch.Generator().manual_seed(seed)
    run = LMRun()
    model.train()
    for step in range(params.steps):
        if ctx is not None:
            stop_if_cancelled(ctx)
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * lr_factor(step, params)
        ids = random_windows(corpus.train_stream, params.batch_size, params.seq_len, generator)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = global_grad_norm(model)
        if params.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)
        run.step_seconds.append(time.perf_counter() - start)
        run.losses.append(loss.item())
        run.grad_norms.append(norm)
        if not math.isfinite(run.losses[-1]) or run.losses[-1] > run.losses[0] + DIVERGENCE_NATS:
            run.diverged = True
            break
        if ctx is not None:
            ctx.log(step + 1, train_loss=run.losses[-1], grad_norm=norm)
            if (step + 1) % report_every == 0 or step + 1 == params.steps:
                ctx.progress(step + 1, params.steps, f"step {step + 1}: loss {run.losses[-1]:.3f}")
    run.state_bytes = optimizer_state_bytes(optimizer)
    run.val_loss = mean_nll(model, corpus.val_windows) if not run.diverged else float("inf")
    if ctx is not None:
        ctx.log(len(run.losses), **{k: v for k, v in run.summary().items() if math.isfinite(v)})
    return run


def finish_lm_job(
    ctx: RunContext, model: LlamaForCausalLM, corpus: CodeCorpus, run: LMRun, name: str, lineage: dict[str, Any]
) -> None:
    """Save the trained model as an HF folder, register it with its numbers, and plot its curves."""
    steps = list(range(1, len(run.losses) + 1))
    panels = {"train loss (nats/token)": {name: (steps, run.losses)}, "gradient norm": {name: (steps, run.grad_norms)}}
    ctx.save_artifact(
        "curves.png", curves_figure(panels, "step", title=f"{name}: val ppl {run.val_ppl:.2f}"), kind="plot"
    )
    if run.diverged:
        ctx.progress(len(run.losses), len(run.losses), "diverged: no model registered")
        return
    lineage = {**lineage, "job_id": ctx.job_id, "seed": ctx.seed, **run.summary()}
    folder = save_folder(model, corpus.tokenizer, ctx.workdir / name, lineage)
    ctx.register_model(name, folder, lineage)


def describe_runs(runs: dict[str, list[LMRun]]) -> dict[str, dict[str, Any]]:
    """Per arm: each summary number averaged over seeds (diverged: the fraction of seeds that diverged)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, seeds in runs.items():
        rows = [r.summary() for r in seeds]
        out[arm] = {k: round(float(np.mean([row[k] for row in rows])), 6) for k in rows[0]}
    return out
