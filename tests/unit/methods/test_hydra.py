"""Hydra (arXiv 2410.18200): gated multi-positive loss invariants, partner sampling, the run's contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation import rankme
from models.methods.representation.hydra import ClassPairGate, HydraParams, hydra_loss, partner_labels, run

torch.set_num_threads(1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(16, 8, generator=g, dtype=torch.float64),
        torch.randn(16, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (16,), generator=g),
    )


def slow_hydra(z1, z2, y1, y2, gate, scale) -> float:
    """The paper's loss written pair by pair, without the row centring."""
    z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    total, count = 0.0, 0
    for i in range(len(z1)):
        logit = [float(scale * (gate[i] ** 2 * z1[i]) @ z2[j]) for j in range(len(z2))]
        negatives = [logit[k] for k in range(len(z2)) if int(y1[k]) not in (int(y1[i]), int(y2[i]))]
        for j in range(len(z2)):
            if int(y1[j]) == int(y2[i]):
                total += math.log(math.exp(logit[j]) + sum(math.exp(v) for v in negatives)) - logit[j]
                count += 1
    return total / count


def test_hydra_loss_matches_a_slow_pair_loop_so_row_centring_changes_nothing(batch):
    z1, z2, y1 = batch
    y2 = partner_labels(y1, "arbitrary", 4, torch.Generator().manual_seed(1))
    gate = torch.rand(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    value = hydra_loss(z1, z2, y1, y2, gate, torch.tensor(7.0, dtype=torch.float64))
    assert float(value) == pytest.approx(slow_hydra(z1, z2, y1, y2, gate, 7.0), rel=1e-10)


def test_open_gates_and_identical_pairs_give_multi_positive_info_nce_at_temperature_one_over_s(batch):
    z1, z2, y = batch
    ones = torch.ones(16, 8, dtype=torch.float64)
    value = hydra_loss(z1, z2, y, y, ones, torch.tensor(4.0, dtype=torch.float64))
    a, b = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    logits = a @ b.T / 0.25
    total, count = 0.0, 0
    for i in range(16):
        neg = torch.logsumexp(logits[i][y != y[i]], 0)
        for j in torch.nonzero(y == y[i]).squeeze(1):
            total += float(torch.logaddexp(logits[i, j], neg) - logits[i, j])
            count += 1
    assert float(value) == pytest.approx(total / count, rel=1e-10)


def test_gates_lie_in_the_open_unit_interval_and_partners_follow_their_mode():
    gate = ClassPairGate(10, 16)
    g = gate(torch.randint(0, 10, (64,)), torch.randint(0, 10, (64,)))
    assert g.shape == (64, 16) and torch.all((g > 0) & (g < 1))
    y = torch.arange(40) % 10
    gen = torch.Generator().manual_seed(0)
    assert torch.all(partner_labels(y, "distinct", 10, gen) != y)
    assert torch.equal(partner_labels(y, "identical", 10, gen), y)
    assert torch.equal(partner_labels(y, "arbitrary", 10, gen).sort().values, y.sort().values)


def test_run_evaluates_registers_an_encoder_that_rankme_can_score():
    ds = load_builtin("digits")
    ctx = InMemoryRunContext(dataset=ds, seed=0)
    run(ctx, HydraParams(epochs=2, width=8, proj_dim=8, batch_size=128, checkpoint_every=1, plot="pca"))
    assert [s for s, _ in ctx.history("train_loss")] == [1, 2] and ctx.latest("scale") > 0
    assert 0.3 < ctx.latest("linear_probe_acc") <= 1.0 and 1.0 <= ctx.latest("rankme") <= 8.0
    for name in ("curves.png", "embedding.png", "relation_map.png"):
        assert ctx.artifacts[name][1].startswith(b"\x89PNG")
    assert ctx.load_checkpoint().step == 2
    (name,) = ctx.models
    scored = InMemoryRunContext(dataset=ds, seed=0)
    scored.models = ctx.models
    rankme.run(scored, rankme.RankMeParams(model=f"{name}@1", full_evaluation=False, plot="none"))
    assert scored.latest("rankme") == pytest.approx(ctx.latest("rankme"), rel=1e-6)


def test_params_are_bounded():
    with pytest.raises(ValidationError):
        HydraParams(pairs="random")
    with pytest.raises(ValidationError):
        HydraParams(temperature=0.0)


def test_an_encoder_trained_at_another_image_size_is_registered_as_built():
    ds = load_builtin("digits")
    ctx = InMemoryRunContext(dataset=ds, seed=0)
    run(ctx, HydraParams(epochs=1, width=8, proj_dim=8, image_size=8, checkpoint_every=0, plot="none"))
    (name,) = ctx.models
    scored = InMemoryRunContext(dataset=ds, seed=0)
    scored.models = ctx.models
    rankme.run(scored, rankme.RankMeParams(model=f"{name}@1", full_evaluation=False, plot="none"))
    assert scored.latest("rankme") == pytest.approx(ctx.latest("rankme"), rel=1e-6)
