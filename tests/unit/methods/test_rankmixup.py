"""RankMixup (Noh et al., ICCV 2023): the ranking losses' invariants and the run's contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.rankmixup import (
    MixupNDCG,
    MixupRanking,
    RankMixupParams,
    folded_ndcg,
    mixup,
    mixup_ranking_loss,
    run,
)
from models.nn.backbones import mlp
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def test_mixup_interpolates_inputs_and_labels_with_one_coefficient():
    torch.manual_seed(0)
    x, y = torch.rand(16, 5), torch.randint(0, 4, (16,))
    m = mixup(x, y, 4, alpha=1.0)
    torch.testing.assert_close(m.x, m.lam * x + (1 - m.lam) * x[m.partner])
    torch.testing.assert_close(m.targets.sum(1), torch.ones(16))
    expected = m.lam * F.one_hot(y, 4) + (1 - m.lam) * F.one_hot(y[m.partner], 4)
    torch.testing.assert_close(m.targets, expected.float())


def test_mrl_is_zero_once_raw_confidence_exceeds_the_mixture_by_the_margin():
    raw = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    mixed = torch.tensor([[0.5, 0.4, 0.0], [0.1, 0.3, 0.2]])  # much less confident
    targets = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    assert mixup_ranking_loss(raw, mixed, targets, margin=0.1) == 0
    # a margin larger than the confidence gap makes it positive, and it is exactly the hinge
    c_raw, c_mix = F.softmax(raw, 1).max(1).values, F.softmax(mixed, 1).max(1).values
    torch.testing.assert_close(mixup_ranking_loss(raw, mixed, targets, margin=0.9), F.relu(c_mix - c_raw + 0.9).mean())


def test_mrl_masks_same_class_pairs_and_ranks_logits_only_when_asked():
    raw = torch.zeros(2, 3)
    mixed = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # the mixture is more confident: a violation
    same_class = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert mixup_ranking_loss(raw, mixed, same_class, margin=0.1) == 0
    two_class = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    on_conf = mixup_ranking_loss(raw, mixed, two_class, margin=0.1, rank_on="confidence")
    on_logit = mixup_ranking_loss(raw, mixed, two_class, margin=0.1, rank_on="logit")
    assert on_conf < 1.0 < on_logit == pytest.approx(5.1)  # probabilities are bounded by 1, logits are not


def test_folded_ndcg_is_one_iff_confidences_equal_relevances_and_below_one_otherwise():
    targets = [torch.tensor([[0.8, 0.2]]), torch.tensor([[0.4, 0.6]]), torch.tensor([[0.7, 0.3]])]

    def logits_for(c: float) -> torch.Tensor:  # softmax max = c
        return torch.tensor([[torch.logit(torch.tensor(c)).item(), 0.0]])

    raw = torch.tensor([[30.0, 0.0]])  # confidence ≈ 1 = the raw sample's relevance
    exact = folded_ndcg(raw, [logits_for(0.8), logits_for(0.6), logits_for(0.7)], targets)
    torch.testing.assert_close(exact, torch.ones(1), atol=1e-6, rtol=0)
    for confs in ([0.99, 0.99, 0.99], [0.55, 0.55, 0.55], [0.6, 0.8, 0.7]):
        value = folded_ndcg(raw, [logits_for(c) for c in confs], targets)
        assert 0 < value.item() < 1 - 1e-4
    # the fold: too confident and not confident enough are both penalised
    over = folded_ndcg(raw, [logits_for(0.95)] * 3, targets)
    under = folded_ndcg(raw, [logits_for(0.55)] * 3, targets)
    assert over < 1 and under < 1


def test_ranking_losses_reduce_to_cross_entropy_when_their_weight_is_zero():
    torch.manual_seed(0)
    model, x, y = mlp(10, 4, hidden=[8]), torch.rand(32, 10), torch.randint(0, 4, (32,))
    ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(MixupNDCG(4, weight=0.0)(model, x, y), ce)
    torch.testing.assert_close(MixupRanking(4, weight=0.0)(model, x, y), ce)


def fast(**overrides: object) -> RankMixupParams:
    return RankMixupParams(**{"hidden": 32, "epochs": 4, "batch_size": 32, "checkpoint_every": 2, **overrides})


def test_run_logs_calibration_and_saves_curves_and_a_reliability_diagram():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast())
    assert {"train_loss", "val_acc", "val_ece", "test_acc", "test_ece", "test_nll"} <= {p.name for p in ctx.metrics}
    assert 0.5 < ctx.latest("test_acc") <= 1.0 and 0 <= ctx.latest("test_ece") <= 1
    for name in ("curves.png", "reliability.png"):
        kind, png = ctx.artifacts[name]
        assert kind == "plot" and png.startswith(b"\x89PNG")


def test_resumed_mixup_run_ends_identical_to_an_uninterrupted_one():
    params = fast(loss="mrl", backbone="cnn", hidden=8)
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), params, seed=2, stop_after=3)
    assert crashed.latest("test_acc") is None
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("test_ece") == whole.latest("test_ece")
