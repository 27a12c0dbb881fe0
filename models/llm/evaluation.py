"""Held-out perplexity and model size: the two numbers every compressed model is registered with.

Perplexity is exp of the mean next-token negative log-likelihood over all predicted tokens of fixed
windows (each window predicts tokens 2..L from its own prefix), token-weighted across batches; it is
computed from the logits rather than from HF's `loss`, which averages per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of `model` on [N, L] token windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(min(mean_nll(model, windows, batch_size), 700.0))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers as stored now (dtype-aware; tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
