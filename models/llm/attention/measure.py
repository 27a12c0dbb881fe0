"""Measurements every attention and KV-cache evaluation reports: held-out perplexity of a model under a registered
attention implementation on a block of held-out windows, and the wall time of one attention call at a sequence
length (one layer, the current thread count), so reproductions and `bench/long_context.py` time things the same
way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field

from models.context import RunContext
from models.datasets import load_builtin
from models.llm.data import split_windows
from models.llm.evaluation import perplexity
from models.registry import MethodParams

# the `model` field of every job in the family; `models.llm.base.model_folder` resolves it
MODEL_FIELD_DESCRIPTION = (
    "a registered name[@version] or imported folder (empty: the cached tiny base; the cached base models' "
    "registry names, the smoke base's llm-base-micro-<hash> among them, also work unregistered)"
)


class AttentionEvalParams(MethodParams):
    """Fields every attention-evaluation job has: the model and the held-out windows; a method subclasses it."""

    model: str = Field("", description=MODEL_FIELD_DESCRIPTION)
    seq_len: int = Field(512, ge=16, le=1 << 20, description="tokens per held-out window (capped at the context)")
    eval_windows: int = Field(16, ge=1, le=4096, description="held-out windows for perplexity")


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Run `model` with the attention function registered as `name`, then restore its previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def perplexity_with(model: torch.nn.Module, name: str, windows: torch.Tensor, batch_size: int = 4) -> float:
    with attention_implementation(model, name):
        return perplexity(model, windows, batch_size)


def random_qkv(
    length: int, heads: int = 1, head_dim: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian q, k, v [1, heads, length, head_dim] for timing (content does not change the cost)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))  # type: ignore[return-value]


@torch.no_grad()
def best_time(fn: Callable[[], object], repeats: int = 2) -> float:
    """Fastest of `repeats` calls, in seconds (the minimum is the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def versus_sdpa(
    length: int,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object],
    heads: int = 1,
    head_dim: int = 64,
    repeats: int = 2,
) -> dict[str, float]:
    """Seconds of one causal attention call at `length`, {"sdpa", "method"}: SDPA and `attention(q, k, v)` on the
    same Gaussian inputs in the same thread, after one untimed call of `attention` (which compiles its kernels
    where it has any)."""
    q, k, v = random_qkv(length, heads, head_dim)
    with torch.no_grad():
        attention(q, k, v)
    return {
        "sdpa": best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), repeats),
        "method": best_time(lambda: attention(q, k, v), repeats),
    }


def held_out_windows(
    ctx: RunContext, tokenizer: Any, context: int, seq_len: int, n: int, block: int = 0
) -> torch.Tensor:
    """`n` windows of min(seq_len, context) tokens from the val split of the job's text corpus (else stdlib-code):
    the `block`-th run of `n` consecutive windows from its start (block 0: the first `n`), so a reproduction's
    seeds can each evaluate a disjoint held-out set."""
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    return held_out_block(tokenizer, ds.val["text"], min(seq_len, context), n, block)


def held_out_block(tokenizer: Any, texts: Any, seq_len: int, n: int, block: int = 0) -> torch.Tensor:
    """Windows block·n … (block+1)·n − 1 of `split_windows(tokenizer, texts, seq_len, ·)`; block 0 is exactly
    `split_windows(tokenizer, texts, seq_len, n)` (the stream is a prefix-stable join of the documents in order)."""
    if block == 0:
        return split_windows(tokenizer, texts, seq_len, n)
    windows = split_windows(tokenizer, texts, seq_len, n * (block + 1))
    if len(windows) < n * (block + 1):
        raise ValueError(f"the split holds {len(windows)} windows of {seq_len} tokens, fewer than block {block} needs")
    return windows[n * block :]
