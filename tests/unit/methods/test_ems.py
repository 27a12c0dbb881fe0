"""EMS-style evict-then-merge invariants: budget ≥ T leaves the cache unchanged, every head keeps
exactly B slots, merges are convex combinations, tau = ∞ is top-B eviction by the global-local score, and the
scores are the kvpress H2O / SnapKV statistics mean-aligned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.llm.kv_cache.ems import EMS, evict_then_merge, global_local_scores
from models.llm.kv_cache.presses import keep_top, observed_attention_scores, window_scores
from models.registry import get_method

torch.set_num_threads(1)
B, H, T, D = 2, 3, 40, 8


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    logits = torch.randn(B, H, T, T, generator=g) * 2
    attention = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return keys, values, attention


def test_budget_at_least_t_leaves_the_cache_unchanged(inputs):
    keys, values, attention = inputs
    out = EMS(T).compress(None, keys, values, attention)
    assert out.keys is keys and out.values is values


@pytest.mark.parametrize("budget", [4, 9, 20, 39])
def test_every_head_keeps_exactly_budget_slots(inputs, budget):
    keys, values, attention = inputs
    out = EMS(budget, window=4).compress(None, keys, values, attention)
    assert out.keys.shape == (B, H, budget, D) and out.values.shape == (B, H, budget, D) and out.valid is None


def test_window_is_kept_verbatim(inputs):
    keys, values, attention = inputs
    out = EMS(12, window=5, tau=-1.0).compress(None, keys, values, attention)
    assert torch.equal(out.keys[:, :, -5:], keys[:, :, -5:]) and torch.equal(out.values[:, :, -5:], values[:, :, -5:])


def test_infinite_tau_is_top_b_eviction_by_the_global_local_score(inputs):
    keys, values, attention = inputs
    budget, window = 12, 4
    out = EMS(budget, window=window, tau=float("inf")).compress(None, keys, values, attention)
    scores = global_local_scores(attention, window, 5, H)
    scores = F.pad(scores, (0, window), value=scores.max().item() + 1)
    reference = keep_top(keys, values, scores, budget)
    assert torch.allclose(out.keys, reference.keys, atol=1e-5)
    assert torch.allclose(out.values, reference.values, atol=1e-6)


def test_merged_values_are_score_weighted_convex_combinations(inputs):
    keys, values, attention = inputs
    window, centres = 4, 6
    scores = global_local_scores(attention, window, 5, H)
    cand_k, cand_v = keys[:, :, :-window], values[:, :, :-window]
    merged_k, merged_v, classes = evict_then_merge(cand_k, cand_v, scores, centres, tau=-1.0)
    assert (classes > 0).sum() > B * H * centres  # something merged
    for b in range(B):
        for h in range(H):
            for c in range(centres):
                members = classes[b, h] == c + 1
                w = scores[b, h, members]
                expected = (w[:, None] * cand_v[b, h, members]).sum(0) / w.sum()
                assert torch.allclose(merged_v[b, h, c], expected, atol=1e-5)
                norm = cand_k[b, h, members].norm(dim=-1).max()
                assert merged_k[b, h, c].norm() <= norm + 1e-5


def test_zero_class_takes_the_irrelevant_and_dissimilar_tokens(inputs):
    keys, values, attention = inputs
    scores = global_local_scores(attention, 4, 5, H)
    _, _, strict = evict_then_merge(keys[:, :, :-4], values[:, :, :-4], scores, 6, tau=0.9)
    _, _, loose = evict_then_merge(keys[:, :, :-4], values[:, :, :-4], scores, 6, tau=-1.0)
    assert ((strict == 0).sum(-1) >= (loose == 0).sum(-1)).all()
    assert ((loose > 0).sum(-1) >= 6).all()


def test_global_local_score_is_mean_aligned_h2o_plus_snapkv(inputs):
    _, _, attention = inputs
    glo = observed_attention_scores(attention, H)[..., :-4]
    loc = window_scores(attention, 4, 5, H)
    s = global_local_scores(attention, 4, 5, H)
    assert torch.allclose(s, glo * loc.mean(-1, keepdim=True) / glo.mean(-1, keepdim=True) + loc, atol=1e-6)
    assert torch.allclose((s - loc).mean(-1), loc.mean(-1), atol=1e-6)  # both halves carry the same mean


def test_ems_job_reports_every_press_at_every_budget_on_the_smoke_base():
    import math

    from models.llm.base import base_model_name
    from models.methods.llm_inference.ems import EMSParams

    ctx = InMemoryRunContext()
    params = EMSParams(
        model=base_model_name(smoke=True),
        seq_len=48,
        context=32,
        eval_windows=2,
        budgets=[8],
        window=4,
        passkey_per_depth=0,
    )
    assert get_method("ems").invoke(ctx, params)
    values = {p.name: p.value for p in ctx.metrics}
    assert {f"ppl_{n}_b8" for n in ("ems_style", "snapkv", "adakv", "h2o", "streaming_llm")} <= set(values)
    assert values["kv_bytes_ems_style_b8"] == pytest.approx(values["kv_bytes_dense_b0"] * 8 / 32)
    assert all(math.isfinite(v) for k, v in values.items() if k.startswith(("ppl", "kv_bytes")))
