"""Measurements every attention method reports: held-out perplexity of a model under a registered attention
implementation, and the wall time of one attention call at a sequence length (one layer, the current thread
count), so reproductions and `bench/long_context.py` time things the same way."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from models.llm.evaluation import perplexity


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


def random_qkv(length: int, heads: int = 1, head_dim: int = 64, seed: int = 0
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
