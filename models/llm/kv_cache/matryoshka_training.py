"""Fitting a MatryoshkaKV projection: PCA calibration, distillation training with Matryoshka rank sampling, and the
greedy per-head rank search for a KV budget (reference: `cal_pcallama_init.py`, `train/pt/trainer.py`,
`cal_adaptive_rate.py` of The-kamisato/MatryoshkaKV-cache).

- Calibration: post-RoPE keys and values of every layer on calibration windows, captured by a registered attention
  function, give each head's PCA basis and means (the initialisation, X = 0).
- Training: only X (hence U) and μ train; the teacher is the same frozen model with exact attention; the loss is
  0.25·KL(teacher ‖ student) + 0.75·CE, every step with freshly sampled per-head ranks; AdamW, cosine schedule.
- Rank search: starting from full rank, repeatedly cut by `cut` the K or V rank of the head whose cut least raises
  the last-hidden-state error ‖h − h_r‖/‖h‖ on calibration windows, until Σ(r_K + r_V) fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.llm.attention.measure import attention_implementation
from models.llm.data import random_windows
from models.llm.distillation import kl_loss
from models.llm.kv_cache.matryoshka import KVProjection, projected

_CAPTURE = "kv-capture"
_captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    _captured.setdefault(module.layer_idx, []).append((key.detach(), value.detach()))
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


AttentionInterface.register(_CAPTURE, _capture)
AttentionMaskInterface.register(_CAPTURE, sdpa_mask)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor) -> KVProjection:
    """The PCA-initialised projection from the model's post-RoPE keys and values on `windows` [N, T]."""
    _captured.clear()
    with attention_implementation(model, _CAPTURE):
        model(input_ids=windows)
    layers = sorted(_captured)
    keys = [torch.cat([k for k, _ in _captured[i]]) for i in layers]
    values = [torch.cat([v for _, v in _captured[i]]) for i in layers]
    _captured.clear()
    return KVProjection.from_pca(keys, values)


def distillation_step(
    model: nn.Module, projection: KVProjection, ids: torch.Tensor, kl_weight: float = 0.25
) -> torch.Tensor:
    """0.25·KL(teacher ‖ student) + 0.75·CE on one batch at the projection's current ranks."""
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    with projected(model, projection):
        student = model(input_ids=ids).logits
    ce = F.cross_entropy(student[:, :-1].reshape(-1, student.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return kl_weight * kl_loss(student, teacher) + (1 - kl_weight) * ce


def train_projection(
    model: nn.Module,
    projection: KVProjection,
    stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    rank_step: int,
    seed: int,
    weight_decay: float = 0.0,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> list[float]:
    """Train U (through X) and μ with Matryoshka rank sampling; the model's own weights stay frozen. AdamW
    (decoupled `weight_decay`, 0 by default) under a cosine schedule.
    `on_step(step, loss)` runs after every step and stops the training by raising (`models.context.Cancelled`
    from `stop_if_cancelled`). Ranks are left at full afterwards."""
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        projection.sample_ranks(rank_step, generator)
        loss = distillation_step(model, projection, random_windows(stream, batch_size, seq_len, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        on_step(step, losses[-1])
    projection.set_ranks(projection.shape[2], projection.shape[2])
    return losses


@torch.no_grad()
def hidden_error(model: nn.Module, projection: KVProjection, windows: torch.Tensor, reference: torch.Tensor) -> float:
    """‖h − h_r‖/‖h‖ of the last hidden state at the projection's ranks."""
    with projected(model, projection):
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    return float((hidden - reference).norm() / reference.norm())


@torch.no_grad()
def greedy_ranks(
    model: nn.Module, projection: KVProjection, windows: torch.Tensor, fraction: float, cut: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (rank_k, rank_v) with Σ(r_K + r_V) ≤ fraction·2·L·H·d, found greedily (module docstring). The
    projection's ranks are restored afterwards."""
    saved = projection.rank_k.clone(), projection.rank_v.clone()
    reference = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    layers, heads, d = projection.shape
    projection.set_ranks(d, d)
    while projection.kv_fraction() > fraction + 1e-9:
        best: tuple[float, torch.Tensor, int, int] | None = None
        for ranks in (projection.rank_k, projection.rank_v):
            for layer in range(layers):
                for head in range(heads):
                    if ranks[layer, head] - cut < cut:
                        continue
                    ranks[layer, head] -= cut
                    error = hidden_error(model, projection, windows, reference)
                    ranks[layer, head] += cut
                    if best is None or error < best[0]:
                        best = (error, ranks, layer, head)
        if best is None:
            break
        best[1][best[2], best[3]] -= cut
    found = projection.rank_k.clone(), projection.rank_v.clone()
    projection.set_ranks(*saved)
    return found
