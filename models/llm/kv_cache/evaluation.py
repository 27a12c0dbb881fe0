"""What a compressed cache costs in quality at a KV budget: the perplexity of a continuation read through the
compressed cache of its context, passkey retrieval with the compressed prompt, and the KV bytes held.

Protocol (kvpress's: compress the context once at prefill, then answer through the compressed cache): each
held-out window of L tokens is split into a `context` prefix, prefilled into a `CompressedCache` under the press,
and a continuation of L − context tokens whose next-token NLL is measured in one forward through that cache (the
first continuation token is predicted by the prefill's last logit). With press None the cache is uncompressed and
the numbers equal the plain model's on the same tokens.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.llm.kv_cache.cache import HEADWISE_ATTENTION, CompressedCache
from models.llm.kv_cache.press import Press, compressing
from models.llm.passkey import PasskeySample


@dataclass(frozen=True)
class BudgetResult:
    nll: float
    kv_bytes: float  # mean bytes per sequence after the prefill was compressed

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, press: Press | None) -> tuple[torch.Tensor, CompressedCache]:
    """Last-position logits [B, V] and the (compressed) cache of `ids` [B, T]."""
    cache = CompressedCache()
    with compressing(model, press):
        out = model(input_ids=ids, cache=cache, use_cache=True)
    return out.logits[:, -1], cache


@torch.no_grad()
def continuation_nll(
    model: nn.Module, windows: torch.Tensor, context: int, press: Press | None, batch_size: int = 8
) -> BudgetResult:
    """Mean NLL of tokens context..L−1 of each window given the compressed cache of tokens 0..context−1."""
    was_training = model.training
    model.eval()
    total, count, bytes_total = 0.0, 0, 0.0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        last, cache = prefill(model, ids[:, :context], press)
        bytes_total += cache.kv_bytes()
        logits = torch.cat([last.unsqueeze(1), model(input_ids=ids[:, context:-1], cache=cache).logits], dim=1)
        target = ids[:, context:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    model.train(was_training)
    return BudgetResult(total / max(count, 1), bytes_total / max(len(windows), 1))


@torch.no_grad()
def passkey_hits(
    model: nn.Module, samples: list[PasskeySample], press: Press | None, question_in_context: bool = False
) -> list[bool]:
    """Per sample, whether the true key ranks first (`models.llm.passkey.passkey_accuracy`'s criterion) when the
    context (the prompt before its question) is prefilled once into a compressed cache and the question and each
    candidate key are read through a copy of it — kvpress's protocol. Prefilling the question with the context
    would leak: the prefill's own forward attends to every context token before the press evicts any, so the first
    key token would be predicted from the uncompressed context. `question_in_context`: the question, all but its
    last token, is prefilled and compressed with the context, so query-aware presses (SnapKV's observation window)
    see it, and the last question token is read through the cache."""
    was_training = model.training
    model.eval()
    hits = []
    for sample in samples:
        split = len(sample.prompt) - (1 if question_in_context else max(sample.question, 1))
        _, cache = prefill(model, sample.prompt[:split].unsqueeze(0), press)
        scores = []
        for key in sample.candidates:
            ids = torch.cat([sample.prompt[split:], key[:-1]]).unsqueeze(0)
            logits = model(input_ids=ids, cache=copy.deepcopy(cache)).logits[0, -len(key) :]
            scores.append(-F.cross_entropy(logits.float(), key, reduction="sum"))
        hits.append(torch.stack(scores).argmax().item() == 0)
    model.train(was_training)
    return hits


def passkey_accuracy_compressed(model: nn.Module, samples: list[PasskeySample], press: Press | None) -> float:
    """Fraction of `samples` retrieved through the compressed cache (`passkey_hits`)."""
    hits = passkey_hits(model, samples, press)
    return sum(hits) / max(len(hits), 1)


def passkey_cells(model: nn.Module, samples: list[PasskeySample], press: Press | None) -> dict:
    """{"passkey": accuracy, "passkey_by_depth": {depth: accuracy}} over `samples` (NaN without samples), and the
    same with the question compressed with the context as "passkey_q", "passkey_q_by_depth"."""
    if not samples:
        return {"passkey": float("nan")}
    cells = {}
    for name, in_context in (("passkey", False), ("passkey_q", True)):
        hits = passkey_hits(model, samples, press, in_context)
        by_depth: dict[float, list[bool]] = {}
        for sample, hit in zip(samples, hits):
            by_depth.setdefault(sample.depth, []).append(hit)
        cells[name] = sum(hits) / len(hits)
        cells[f"{name}_by_depth"] = {depth: sum(h) / len(h) for depth, h in sorted(by_depth.items())}
    return cells


def budget_sweep(
    model: nn.Module,
    windows: torch.Tensor,
    context: int,
    presses: dict[str, Callable[[int], Press]],
    budgets: tuple[int, ...],
    samples: list[PasskeySample] = (),
    on_done: Callable[[str, int], None] = lambda name, budget: None,
    passkey_model: nn.Module | None = None,
) -> dict[str, dict[int, dict]]:
    """ppl, passkey accuracy (overall and per needle depth) and KV bytes per press name and per-head budget, plus
    the dense row under `"dense"` (budget 0). Passkey runs on `passkey_model` when given (a retrieval-tuned
    variant: `models.llm.retrieval_tuning`), else on `model`. Runs under `HEADWISE_ATTENTION` (plain SDPA unless
    a cache carries head-wise padding)."""
    models = [model] + ([passkey_model] if passkey_model is not None else [])
    previous = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation(HEADWISE_ATTENTION)
    table: dict[str, dict[int, dict]] = {}
    try:
        runs = [("dense", 0, None)] + [(name, b, make(b)) for name, make in presses.items() for b in budgets]
        for name, budget, press in runs:
            result = continuation_nll(model, windows, context, press)
            table.setdefault(name, {})[budget] = {
                "ppl": result.ppl,
                "nll": result.nll,
                "kv_bytes": result.kv_bytes,
                **passkey_cells(passkey_model if passkey_model is not None else model, list(samples), press),
            }
            on_done(name, budget)
    finally:
        for m, impl in zip(models, previous):
            m.set_attn_implementation(impl)
    return table
