"""Moment probing (Gao et al., ICCV 2023): the head's stated structure (first-order-only MP is a linear probe,
W₂ = 0 halves it), the covariance branch's invariances and shapes, the tiny ViT, and the run's contract."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.moment_probing import (
    MomentProbe,
    MomentProbingParams,
    class_pools,
    cross_covariance,
    downsampled_side,
    run,
    sample_shots,
)
from models.nn.vit import TinyViT
from models.registry import registered_spec

torch.set_num_threads(1)
B, L, D, C = 3, 16, 24, 5


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(B, 1 + L, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def probe(**kw: object) -> MomentProbe:
    torch.manual_seed(0)
    return MomentProbe(D, C, **{"hidden": 64, "heads": 4, **kw}).double()


@pytest.mark.parametrize("first_order", ["cls", "mean"])
def test_first_order_only_moment_probing_is_a_linear_probe_on_cls_or_mean_token(tokens, first_order):
    lp = probe(first_order=first_order, second_order=False)
    feature = tokens[:, 0] if first_order == "cls" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(lp(tokens), feature @ lp.classifier1.weight.T + lp.classifier1.bias)
    assert lp.second_order_dim == 0 and not hasattr(lp, "classifier2")


def test_zero_second_order_classifier_gives_half_the_linear_probe(tokens):
    mp = probe()
    with torch.no_grad():
        mp.classifier2.weight.zero_()
        mp.classifier2.bias.zero_()
    lp = probe(second_order=False)
    lp.classifier1.load_state_dict(mp.classifier1.state_dict())
    torch.testing.assert_close(mp(tokens), lp(tokens) / 2)


def test_logits_average_the_two_moment_classifiers(tokens):
    mp = probe()
    expected = (mp.classifier1(tokens[:, 0]) + mp.classifier2(mp.second_moment(tokens))) / 2
    torch.testing.assert_close(mp(tokens), expected)


def test_cross_covariance_ignores_a_vector_added_to_every_token_and_matches_a_slow_reference():
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(2, 10, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 10, 3, generator=g, dtype=torch.float64),
    )
    sigma = cross_covariance(a, b)
    shifted = cross_covariance(
        a + torch.randn(4, generator=g, dtype=torch.float64), b + torch.randn(3, generator=g, dtype=torch.float64)
    )
    torch.testing.assert_close(shifted, sigma)
    slow = torch.zeros(2, 4, 3, dtype=torch.float64)
    for n in range(2):
        ma, mb = a[n].mean(0), b[n].mean(0)
        for t in range(10):
            slow[n] += torch.outer(a[n, t] - ma, b[n, t] - mb) / 10
    torch.testing.assert_close(sigma, slow)
    torch.testing.assert_close(cross_covariance(b, a), sigma.transpose(1, 2))  # Σ(b, a) = Σ(a, b)ᵀ
    auto = cross_covariance(a, a)
    torch.testing.assert_close(auto, auto.transpose(1, 2))
    assert torch.linalg.eigvalsh(auto).min() > -1e-12  # a covariance is positive semi-definite


def test_second_order_branch_is_invariant_to_the_order_of_patch_tokens(tokens):
    mp = probe()
    shuffled = torch.cat([tokens[:, :1], tokens[:, 1:][:, torch.randperm(L)]], dim=1)
    torch.testing.assert_close(mp.second_moment(shuffled), mp.second_moment(tokens))
    torch.testing.assert_close(mp(shuffled), mp(tokens))  # the first moment is [CLS], untouched


def test_covariance_maps_have_the_papers_shapes_and_unit_columns(tokens):
    mp = probe()
    maps = mp.covariance_maps(tokens)
    assert maps.shape == (B, 3, 16, 16)
    torch.testing.assert_close(maps.norm(dim=2), torch.ones(B, 3, 16, dtype=torch.float64))
    # ViT-B: hidden 512 in 4 heads of 128 → 3 maps of 128×128 → 3·31·31 = 2883 features (the released number)
    assert downsampled_side(128) == 31 and MomentProbe(768, 10, hidden=512, heads=4).second_order_dim == 2883
    assert MomentProbe(64, 5, hidden=256, heads=4).second_order_dim == 3 * 15 * 15


def test_head_widths_that_cannot_be_convolved_are_refused():
    with pytest.raises(ValueError, match="heads"):
        MomentProbe(D, C, hidden=30, heads=4)
    with pytest.raises(ValueError, match="too small"):
        MomentProbe(D, C, hidden=16, heads=4)


def test_tiny_vit_tokens_start_with_cls_and_its_logits_read_cls():
    vit = TinyViT(1, 8, 5, patch=2, dim=16, depth=1, heads=2)
    x = torch.rand(4, 1, 8, 8)
    z = vit.tokens(x)
    assert z.shape == (4, 17, 16)
    torch.testing.assert_close(vit(x), vit.head(z[:, 0]))
    with pytest.raises(ValueError, match="multiple"):
        TinyViT(1, 8, 5, patch=3)


def test_shots_are_drawn_per_class_and_the_novel_classes_are_unseen_in_pretraining():
    pools = class_pools(load_builtin("digits"), 5)
    assert set(pools.base["train"][1].tolist()) == set(range(5)) and pools.num_base == 5
    assert set(pools.novel["test"][1].tolist()) == set(range(5))
    y = pools.novel["train"][1]
    picked = sample_shots(y, 3, seed=0)
    assert torch.bincount(y[picked]).tolist() == [3] * 5
    assert torch.equal(picked, sample_shots(y, 3, seed=0)) and len(sample_shots(y, None, 0)) == len(y)


def test_run_logs_accuracy_and_calibration_and_saves_plots():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    params = MomentProbingParams(
        vit_depth=1,
        vit_dim=16,
        pretrain_epochs=1,
        hidden=32,
        shots=4,
        epochs=3,
        checkpoint_every=1,
        optimizer="sgd",
        lr=0.05,
    )
    run(ctx, params)
    assert [s for s, _ in ctx.history("val_acc")] == [1, 2, 3]
    assert 0.0 <= ctx.latest("test_acc") <= 1.0 and 0.0 <= ctx.latest("test_ece") <= 1.0
    assert {"val_ece", "val_nll", "test_nll"} <= {p.name for p in ctx.metrics}
    assert len(ctx.checkpoints) == 3
    for name in ("curves.png", "reliability.png"):
        assert ctx.artifacts[name][1].startswith(b"\x89PNG")


def test_params_refuse_too_few_classes_and_unknown_probes():
    with pytest.raises(ValidationError):
        MomentProbingParams(probe="full")
    with pytest.raises(ValueError, match="base classes"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), MomentProbingParams(novel_classes=9))


def test_cross_covariance_is_the_off_diagonal_block_of_torch_cov():
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(1, 12, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 12, 5, generator=g, dtype=torch.float64),
    )
    joint = torch.cov(torch.cat([a[0], b[0]], dim=1).T, correction=0)  # variables × observations
    torch.testing.assert_close(cross_covariance(a, b)[0], joint[:4, 4:])


def test_cancel_during_pretraining_stops_before_any_probe_epoch():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    reports = []

    def cancel_at_first_report(done: int, total: int, message: str) -> None:
        reports.append(message)
        ctx.cancel()

    ctx.on_progress = cancel_at_first_report
    params = MomentProbingParams(vit_depth=1, vit_dim=16, pretrain_epochs=50, hidden=32, shots=4, epochs=3)
    assert not registered_spec(run).invoke(ctx, params)
    assert reports == ["pre-training the backbone on the base classes"]
    assert not ctx.history("val_acc") and not ctx.artifacts and not ctx.checkpoints
