"""iCT's invariants: the boundary condition, the doubling schedule, the lognormal index law, pseudo-Huber."""

from __future__ import annotations

import math

import torch

from models.context import InMemoryRunContext
from models.diffusion.model import new_parts
from models.methods.diffusion.ict import (
    SIGMA_MAX,
    SIGMA_MIN,
    ConsistencyConfig,
    consistency_fn,
    consistency_sample,
    ct_levels,
    ict_levels,
    karras_sigmas,
    lognormal_index_probs,
    pseudo_huber,
    train_consistency,
)

torch.set_num_threads(1)


def test_consistency_function_is_the_identity_at_sigma_min():
    torch.manual_seed(0)
    parts = new_parts(widths=(8, 16)).eval()
    x = torch.randn(3, 3, 16, 16)
    tokens = torch.tensor([[1, 2, 0], [4, 6, 3], [9, 0, 1]])
    with torch.no_grad():
        assert torch.equal(consistency_fn(parts, x, torch.full((3,), SIGMA_MIN), tokens), x)
        assert not torch.allclose(consistency_fn(parts, x, torch.full((3,), 1.0), tokens), x)


def test_ict_discretisation_starts_at_11_ends_at_1281_and_doubles():
    total = 8000
    levels = [ict_levels(k, total) for k in range(total + 1)]
    assert levels[0] == 11 and levels[-1] == 1281
    assert all(a <= b for a, b in zip(levels, levels[1:]))
    distinct = sorted(set(levels))
    assert all((b - 1) == 2 * (a - 1) for a, b in zip(distinct, distinct[1:]))
    assert ct_levels(0, 100) == 2 and ct_levels(100, 100) == 151


def test_karras_grid_spans_sigma_min_to_sigma_max_and_index_law_sums_to_one():
    s = karras_sigmas(11)
    assert math.isclose(s[0].item(), SIGMA_MIN, rel_tol=1e-9) and math.isclose(s[-1].item(), SIGMA_MAX, rel_tol=1e-9)
    assert (s[1:] > s[:-1]).all()
    p = lognormal_index_probs(karras_sigmas(1281))
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-9) and (p >= 0).all() and len(p) == 1280
    # mass concentrates around exp(P_mean) ≈ 0.33, not at the ends
    peak = karras_sigmas(1281)[p.argmax()].item()
    assert 0.05 < peak < 2.0


def test_pseudo_huber_is_zero_on_equal_inputs_quadratic_near_and_linear_far():
    a = torch.zeros(2, 3, 16, 16)
    c = 0.00054 * math.sqrt(3 * 16 * 16)
    assert pseudo_huber(a, a).abs().max() == 0
    small = torch.full_like(a, 1e-5)
    sq = small.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(pseudo_huber(small, a), sq / (2 * c), rtol=1e-2, atol=0)
    big = torch.full_like(a, 1.0)
    torch.testing.assert_close(pseudo_huber(big, a), big.flatten(1).norm(dim=1) - c, rtol=1e-4, atol=0)


def test_ict_teacher_is_the_student_and_ct_teacher_lags_behind():
    ctx = InMemoryRunContext()
    parts, losses = train_consistency(ctx, ConsistencyConfig("ict", steps=2, batch_size=4, widths=(8, 16)))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    tokens = torch.tensor([[3, 6, 3]] * 2)
    one, two = consistency_sample(parts, tokens, 1, 0), consistency_sample(parts, tokens, 2, 0)
    assert one.shape == two.shape == (2, 3, 16, 16) and not torch.allclose(one, two)
