"""Our versions of the kvpress eviction presses EMS is compared against, at a per-head budget of `budget` slots.

kvpress (NVIDIA, `kvpress/presses/*.py`) is the field's reference for these baselines, but its 0.5 release pins
transformers < 5.3 and its hook cannot run on 5.24 (see `press.py`), so the reproduction runs these; each score
and each selection is checked against kvpress's own `score` / `compress` in `tests/unit/kits/test_kv_cache.py` when
kvpress is importable. kvpress states budgets as a compression ratio; `budget` tokens per head of T is the ratio
1 − budget/T.

- StreamingLLM (Xiao et al. 2024): keep `sinks` first tokens and the most recent ones (`StreamingLLMPress`).
- H2O (Zhang et al. 2023) as kvpress's `ObservedAttentionPress`: a token's attention summed over the queries that
  can see it, divided by their number (T − j), averaged over the query heads of a KV group.
- SnapKV (Li et al. 2024): mean attention from the last `window` queries, 1-D average pooling of width `kernel`,
  the window itself always kept (`SnapKVPress`).
- AdaKV (Feng et al. 2024): the per-layer budget H·budget spent where scores are highest across heads, every head
  keeping at least ⌊alpha·budget⌋ of its own best (`AdaKVPress` over SnapKV). Heads keep different numbers of slots,
  stored padded with a validity mask (kvpress instead leaves them in place behind "fake keys").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.llm.kv_cache.press import Compressed, gather_slots


def group_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H_q, T] → [B, H_kv, T]: mean over the query heads sharing a KV head."""
    b, h, t = scores.shape
    return scores.view(b, kv_heads, h // kv_heads, t).mean(2)


def observed_attention_scores(attention: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """H2O / kvpress `ObservedAttentionPress.score`: Σ_i A[i, j] / (T − j), [B, H_kv, T]."""
    t = attention.shape[-1]
    seen_by = torch.arange(t, 0, -1, device=attention.device, dtype=attention.dtype)
    return group_mean(attention.sum(2) / seen_by, kv_heads)


def window_scores(attention: torch.Tensor, window: int, kernel: int, kv_heads: int) -> torch.Tensor:
    """SnapKV's score of the tokens before the window: mean attention from the last `window` queries, average-pooled
    with width `kernel` (kvpress `SnapKVPress.score` before it pads the window), [B, H_kv, T − window]."""
    scores = attention[..., -window:, :-window].mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)
    return group_mean(scores, kv_heads)


def snapkv_scores(attention: torch.Tensor, window: int, kernel: int, kv_heads: int) -> torch.Tensor:
    """Scores over all T tokens with the window set above every other token (so it is always kept)."""
    scores = window_scores(attention, window, kernel, kv_heads)
    return F.pad(scores, (0, window), value=scores.max().item() + 1)


def keep_top(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, budget: int) -> Compressed:
    """The `budget` highest-scored tokens of every head, in position order."""
    index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    return Compressed(gather_slots(keys, index), gather_slots(values, index))


@dataclass
class StreamingLLM:
    budget: int
    sinks: int = 4
    needs_attention = False

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        t = keys.shape[2]
        scores = torch.ones_like(keys[..., 0])
        scores[:, :, self.sinks : self.sinks + t - self.budget] = 0
        return scores

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed:
        if keys.shape[2] <= self.budget:
            return Compressed(keys, values)
        return keep_top(keys, values, self.scores(keys), self.budget)


@dataclass
class H2O:
    budget: int
    needs_attention = True

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed:
        if keys.shape[2] <= self.budget:
            return Compressed(keys, values)
        return keep_top(keys, values, observed_attention_scores(attention, keys.shape[1]), self.budget)


@dataclass
class SnapKV:
    budget: int
    window: int = 8
    kernel: int = 5
    needs_attention = True

    def scores(self, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return snapkv_scores(attention, min(self.window, self.budget), self.kernel, keys.shape[1])

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed:
        if keys.shape[2] <= self.budget:
            return Compressed(keys, values)
        return keep_top(keys, values, self.scores(keys, attention), self.budget)


def adakv_keep_mask(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """Which tokens each head keeps [B, H, T]: H·budget per layer in all, at least ⌊alpha·budget⌋ (≥ 1) per head."""
    b, h, t = scores.shape
    safe = max(1, int(budget * alpha)) if alpha > 0 else 0
    scores = scores.clone()
    if safe:
        scores.scatter_(-1, scores.topk(safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    kept = scores.reshape(b, -1).topk(h * budget, dim=-1).indices
    return torch.zeros(b, h * t, dtype=torch.bool, device=scores.device).scatter_(1, kept, True).view(b, h, t)


@dataclass
class AdaKV:
    budget: int
    window: int = 8
    kernel: int = 5
    alpha: float = 0.2
    needs_attention = True

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed:
        if keys.shape[2] <= self.budget:
            return Compressed(keys, values)
        scores = SnapKV(self.budget, self.window, self.kernel).scores(keys, attention)
        keep = adakv_keep_mask(scores, self.budget, self.alpha)
        longest = int(keep.sum(-1).max())
        # kept positions first (in order), padding after: sort by (not kept, position)
        t = keys.shape[2]
        order = (~keep).long() * t + torch.arange(t, device=keys.device)
        index = order.argsort(dim=-1)[..., :longest]
        valid = keep.gather(-1, index)
        return Compressed(gather_slots(keys, index), gather_slots(values, index), valid)
