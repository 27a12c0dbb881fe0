"""DSL (attention-based dynamic subspace learners): learner slices, neuron splitting, attention, cluster
matching, parity with pytorch-metric-learning, and the run's contract."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation.dsl import (
    DSLParams,
    SubspaceEmbedder,
    equal_slices,
    learner_loss,
    make_margin_loss,
    matched_clusters,
    run,
    split_last_learner,
    taylor_scores,
)
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


@pytest.fixture
def model() -> SubspaceEmbedder:
    torch.manual_seed(0)
    return SubspaceEmbedder(width=16, embedding_dim=32, learners=1).eval()


def test_with_one_learner_the_embedding_is_the_single_metric_learner(model):
    x = torch.rand(6, 1, 8, 8)
    h, _ = model.pooled(x)
    torch.testing.assert_close(model(x), F.normalize(model.embedding(h), dim=1))


@pytest.mark.parametrize(("dim", "k"), [(128, 1), (128, 3), (10, 4), (7, 7)])
def test_equal_slices_are_disjoint_and_cover_every_dimension(dim, k):
    slices = equal_slices(dim, k)
    assert torch.equal(torch.sort(torch.cat(slices)).values, torch.arange(dim))


def test_every_learner_slice_is_unit_norm():
    torch.manual_seed(1)
    m = SubspaceEmbedder(width=16, embedding_dim=30, learners=4).eval()
    z = m(torch.rand(5, 1, 8, 8))
    for idx in m.learners:
        torch.testing.assert_close(z[:, idx].norm(dim=1), torch.ones(5))


def test_a_split_keeps_high_scoring_neurons_their_weights_and_every_other_learner_unchanged():
    torch.manual_seed(2)
    m = SubspaceEmbedder(width=16, embedding_dim=40, learners=2).eval()
    x = torch.rand(7, 1, 8, 8)
    before = m(x)
    first, last = m.learners[0].clone(), m.learners[1].clone()
    # kept neurons include one already at the front (position 0) and ones behind it: a row-by-row copy
    # would overwrite position 0 before it is read
    scores = torch.zeros(len(last))
    scores[[7, 0, 12, 3, 19, 5]] = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.55])
    kept_rows = m.embedding.weight[last[[7, 0, 12, 3, 19, 5]]].clone()
    raw_before = m.embedding(m.pooled(x)[0])[:, last[[7, 0, 12, 3, 19, 5]]]
    assert split_last_learner(m, scores)
    assert len(m.learners) == 3 and torch.equal(m.learners[0], first)
    assert torch.equal(torch.sort(torch.cat(m.learners)).values, torch.arange(40))
    assert torch.equal(m.learners[1], last[:6]) and torch.equal(m.learners[2], last[6:])
    torch.testing.assert_close(m.embedding.weight[m.learners[1]], kept_rows)
    torch.testing.assert_close(m.embedding(m.pooled(x)[0])[:, m.learners[1]], raw_before)
    after = m(x)
    torch.testing.assert_close(after[:, first], before[:, first])  # the untouched learner's output
    for idx in m.learners:
        torch.testing.assert_close(after[:, idx].norm(dim=1), torch.ones(7))


def test_the_split_rule_declines_small_learners_and_too_few_confident_neurons(model):
    assert not split_last_learner(model, torch.zeros(32))  # nobody above 0.5
    few = torch.zeros(32)
    few[:4] = 1.0
    assert not split_last_learner(model, few)  # 4 < 5 kept
    torch.manual_seed(0)
    small = SubspaceEmbedder(width=16, embedding_dim=20, learners=2)  # last learner has 10 neurons
    assert not split_last_learner(small, torch.ones(10)) and len(small.learners) == 2


def test_taylor_scores_are_normalised_to_the_unit_interval():
    s = taylor_scores(torch.tensor([0.0, -3.0, 1.5, 6.0, -0.5]))
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0
    torch.testing.assert_close(s, torch.tensor([0.0, 0.5, 0.25, 1.0, 0.5 / 6]))
    torch.testing.assert_close(
        taylor_scores(torch.tensor([2.0, -1.0, 0.5])), taylor_scores(torch.tensor([20.0, 10.0, -5.0]))
    )  # scale and sign free


def test_attention_is_a_per_position_gate_and_a_gate_of_one_is_plain_average_pooling(model):
    x = torch.rand(4, 1, 8, 8)
    f = model.body(x)
    a = model.attention(f)
    assert a.shape == (4, 1, *f.shape[-2:]) and bool(((a > 0) & (a < 1)).all())
    with torch.no_grad():
        model.attention.layers[-2].bias.fill_(1e4)  # σ(large) = 1 everywhere
    torch.testing.assert_close(model.pooled(x)[0], f.mean((2, 3)))


def test_reclustering_keeps_learners_on_their_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(90) % 3
    z = centres[labels] + 0.1 * torch.randn(90, 2, generator=g)
    previous = torch.tensor([2, 0, 1])[labels]  # an arbitrary earlier numbering of the same groups
    assert torch.equal(matched_clusters(z, 3, previous, seed=0), previous)
    assert torch.equal(matched_clusters(z, 1, previous, seed=0), torch.zeros(90, dtype=torch.long))


def test_learner_loss_is_pytorch_metric_learnings_margin_loss_on_distance_weighted_triplets():
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(3)
    z, y = F.normalize(torch.randn(40, 8, generator=g), dim=1), torch.arange(40) % 4
    loss_fn, miner = make_margin_loss()
    ours = learner_loss(z, y, loss_fn, miner, torch.Generator().manual_seed(5))
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(seed)
    triplets = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(z, y)
    reference = losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2)(z, y, triplets)
    assert float(ours) == pytest.approx(float(reference), rel=1e-6) and float(ours) > 0


def fast(**overrides: object) -> DSLParams:
    return DSLParams(
        **{
            "epochs": 6,
            "batches_per_epoch": 2,
            "samples_per_class": 8,
            "width": 16,
            "embedding_dim": 32,
            "patience": 1,
            "finetune_epochs": 1,
            "eval_every": 3,
            "checkpoint_every": 2,
            "plot": "pca",
            **overrides,
        }
    )


def test_run_grows_learners_and_scores_unseen_classes():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast())
    assert [s for s, _ in ctx.history("val_nmi")] == [1, 2, 3, 4, 5, 6]
    assert 0.0 <= ctx.latest("unseen_nmi") <= 1.0 and 0.2 < ctx.latest("unseen_recall_at_1") <= 1.0
    assert [n for _, n in ctx.history("learners")] == [1, 1, 1, 2, 2, 2]  # the NMI plateau after epoch 3 split one
    assert ctx.latest("learners_final") == 2 and ctx.load_checkpoint().step == 6
    for name in ("curves.png", "attention.png", "unseen_embedding.png"):
        assert ctx.artifacts[name][1].startswith(b"\x89PNG")
    report = json.loads(ctx.artifacts["report.json"][1])
    assert report["learners_final"] == 2 and sum(report["learner_sizes"]) == 32 and report["split_epochs"] == [4]


def test_resumed_run_ends_identical_with_its_grown_learners():
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), fast(), seed=0, stop_after=4)
    assert crashed.load_checkpoint().step == 4 and "report.json" not in crashed.artifacts
    assert len(crashed.load_checkpoint().state["growth"]["learners"]) == 2  # the split of epoch 4 is in it
    assert resumed.history("val_nmi") == whole.history("val_nmi")[4:]
    assert resumed.latest("unseen_recall_at_1") == whole.latest("unseen_recall_at_1")
    assert resumed.latest("learners_final") == whole.latest("learners_final")


def test_params_are_checked():
    with pytest.raises(ValidationError):
        DSLParams(mode="grow")
    with pytest.raises(ValueError, match="unseen"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), fast(seen_classes=10))
