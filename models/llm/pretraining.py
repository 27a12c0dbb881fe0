"""Causal-LM pre-training of a tiny Llama on a text corpus: the `lm-pretrain` job's loop.

Train a byte-level BPE tokenizer on the train split, pack the split into one token stream, and
train `LlamaForCausalLM` on random windows with AdamW (β = 0.9/0.95, decoupled weight decay, global
gradient clipping) under linear warm-up then cosine decay to 10% of the peak rate — the usual
GPT/Llama recipe at small scale. Held-out loss and perplexity on the val split are logged every
`eval_every` steps.

Resumable: a checkpoint holds the weights, optimizer moments, the batch generator's state, the
step and the tokenizer itself (its JSON), so a re-queued attempt rebuilds exactly the same tokenizer
and continues with exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.context import RunContext, stop_if_cancelled
from models.datasets import Dataset
from models.llm.data import fixed_windows, random_windows, token_stream
from models.llm.evaluation import mean_nll
from models.llm.model import SIZES, SizeName, build_model, llama_config, parameter_count
from models.llm.tokenizer import train_tokenizer, wrap
from models.optim import build_optimizer, optimizer_state_bytes
from models.params import ResumableParams, StepTrainingParams


class PretrainParams(StepTrainingParams, ResumableParams):
    """The pre-training recipe. Its fields (names and values) are hashed into the cached base model's key
    (`models.llm.base.recipe_key`): adding, renaming or re-defaulting one changes every cached base model."""

    size: SizeName = Field("tiny", description="model size: micro (≈0.36M), tiny (≈1.3M) or small (≈4.2M, TL-S)")
    vocab_size: int = Field(4096, ge=300, le=65536, description="BPE vocabulary size, special tokens included")
    steps: int = Field(400, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=1024, description="windows per step")
    seq_len: int = Field(256, ge=8, le=8192, description="tokens per window (≤ the size's context length)")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps; cosine decay to 10% of lr after")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="AdamW decoupled weight decay (matrices only)")
    grad_clip: float = Field(1.0, gt=0.0, description="global gradient-norm clip")
    eval_every: int = Field(100, ge=1, description="log held-out loss and perplexity every N steps")
    eval_windows: int = Field(16, ge=1, le=4096, description="val windows (of seq_len tokens) per evaluation")
    checkpoint_every: int = Field(100, ge=0, description="save a checkpoint every N steps (0: never)")
    max_documents: int = Field(0, ge=0, description="use only the first N documents of each split (0: all)")
    model_name: str = Field(
        "tiny-llama",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="name to register the trained model under",
    )

    @model_validator(mode="after")
    def _window_fits_context(self) -> PretrainParams:
        context = SIZES[self.size].max_position_embeddings
        if self.seq_len > context:
            raise ValueError(f"seq_len {self.seq_len} exceeds the {self.size} model's context of {context}")
        return self


@dataclass
class Pretrained:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    history: list[dict[str, float]] = field(default_factory=list)
    val_loss: float = float("nan")
    optimizer_bytes: int = 0  # the optimizer's state (moments, projectors) at the end, not the weights

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


def lr_at(step: int, params: PretrainParams) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr/10 at the last step."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
    return params.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def pretrain_optimizer(model: torch.nn.Module, params: PretrainParams, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (β = 0.9/0.95) with weight decay on matrices only, not norms, as in nanoGPT; any other
    optimizer of the `models.optim` registry (FRUGAL, Stable-SPAM, GaLore, ...) with its own defaults
    at this lr and weight decay, so `lm-pretrain` can train with each of them."""
    if name != "adamw":
        return build_optimizer(name, model, lr=params.lr, weight_decay=params.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return build_optimizer(
        "adamw",
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr,
        betas=(0.9, 0.95),
    )


def _texts(dataset: Dataset, split: str, params: PretrainParams) -> list[str]:
    texts = list(dataset.splits[split]["text"])
    return texts[: params.max_documents] if params.max_documents else texts


def pretrain(ctx: RunContext, params: PretrainParams, optimizer_name: str = "adamw") -> Pretrained:
    """Train (or resume) a tiny Llama on `ctx.dataset` (`Cancelled` when cancelled). `optimizer_name` is not a
    PretrainParams field because the cached base model is keyed by those fields (models/llm/base.py)."""
    ds = ctx.dataset
    if ds is None or ds.kind != "text-corpus":
        raise ValueError("lm-pretrain needs a 'text-corpus' dataset such as stdlib-code")
    checkpoint = ctx.load_checkpoint()
    context = SIZES[params.size].max_position_embeddings
    if checkpoint is not None:
        tokenizer = wrap(Tokenizer.from_str(checkpoint.state["tokenizer"]), context)
    else:
        ctx.progress(0, params.steps, "training the BPE tokenizer")
        tokenizer = train_tokenizer(_texts(ds, "train", params), params.vocab_size, context)
    train_stream = token_stream(tokenizer, _texts(ds, "train", params))
    val_windows = fixed_windows(token_stream(tokenizer, _texts(ds, "val", params)), params.seq_len, params.eval_windows)
    config = llama_config(
        params.size, len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model = build_model(config, ctx.seed).to(ctx.device)
    optimizer = pretrain_optimizer(model, params, optimizer_name)
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = 0, []
    if checkpoint is not None:
        state = checkpoint.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, history = int(state["step"]), list(state["history"])
        ctx.progress(start, params.steps, f"resumed from the checkpoint at step {start}")
    else:
        ctx.log(0, parameters=parameter_count(model), train_tokens=len(train_stream))
    val_loss = history[-1]["val_loss"] if history else float("nan")
    model.train()
    for step in range(start, params.steps):
        stop_if_cancelled(ctx)
        lr = lr_at(step, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = random_windows(train_stream, params.batch_size, params.seq_len, generator).to(ctx.device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        done = step + 1
        row: dict[str, float] = {"train_loss": loss.item(), "lr": lr}
        if done % params.eval_every == 0 or done == params.steps:
            val_loss = mean_nll(model, val_windows)
            row |= {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
            history.append({"step": done, **row})
            model.train()
        ctx.log(done, **row)
        ctx.progress(
            done,
            params.steps,
            f"step {done}: loss {row['train_loss']:.3f}"
            + (f", val ppl {row['val_ppl']:.2f}" if "val_ppl" in row else ""),
        )
        if params.checkpoint_every and (done % params.checkpoint_every == 0 or done == params.steps):
            ctx.save_checkpoint(_state(model, optimizer, generator, done, history, tokenizer), done)
    return Pretrained(model.eval(), tokenizer, history, val_loss, optimizer_state_bytes(optimizer))


def _state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    history: list[dict[str, float]],
    tokenizer: PreTrainedTokenizerFast,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "history": history,
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
    }
