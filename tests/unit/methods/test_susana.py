"""SuSana (Proto-Triplet, ICNN) and the episodic kit: ProtoNet against a slow reference, the losses'
stated properties, parity with pytorch-metric-learning's triplet loss, and the run's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.episodes import EpisodeSampler, EpisodeSpec, evaluate_episodes, mean_ci95, prototype_logits
from models.methods.classification.susana import (
    EpisodicLoss,
    SusanaParams,
    few_shot_split,
    icnn_score,
    proto_triplet_loss,
    protonet_loss,
    run,
)
from models.registry import registered_spec

torch.set_num_threads(1)
SPEC = EpisodeSpec(way=4, shot=3, query=5)


def episode_embeddings(seed: int = 0, dim: int = 6, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(SPEC.way, dim, generator=g, dtype=torch.float64) * 3
    support = centres[:, None] + spread * torch.randn(SPEC.way, SPEC.shot, dim, generator=g, dtype=torch.float64)
    queries = centres.repeat_interleave(SPEC.query, 0) + spread * torch.randn(
        SPEC.way * SPEC.query, dim, generator=g, dtype=torch.float64
    )
    return torch.cat([support.reshape(-1, dim), queries])


def fast_params(**overrides: object) -> SusanaParams:
    return SusanaParams(
        **{
            "width": 8,
            "epochs": 2,
            "episodes_per_epoch": 4,
            "test_episodes": 20,
            "val_episodes": 5,
            "optimizer": "sgd",
            "lr": 0.01,
            "test_shots": [1, 5],
            "checkpoint_every": 1,
            **overrides,
        }
    )


def test_protonet_loss_is_cross_entropy_over_negative_squared_distances_to_class_means():
    z = episode_embeddings()
    support, queries = SPEC.split(z)
    labels = SPEC.query_labels()
    expected = 0.0
    for q, y in zip(queries, labels):  # slow reference: one query at a time, one class at a time
        means = [sum(support[k, s] for s in range(SPEC.shot)) / SPEC.shot for k in range(SPEC.way)]
        scores = torch.stack([-sum((q[j] - m[j]) ** 2 for j in range(len(q))) for m in means])
        expected += -(scores[y] - torch.logsumexp(scores, 0)) / len(labels)
    torch.testing.assert_close(protonet_loss(support, queries, labels), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(EpisodicLoss(SPEC).parts(z)["ce"], expected, rtol=1e-12, atol=1e-12)


def test_prototype_logits_with_temperature_scale_inversely():
    support, queries = SPEC.split(episode_embeddings())
    one, _ = prototype_logits(support, queries, 1.0)
    four, prototypes = prototype_logits(support, queries, 4.0)
    torch.testing.assert_close(four, one / 4)
    torch.testing.assert_close(prototypes, support.mean(1))


def test_proto_triplet_is_zero_once_every_query_beats_the_nearest_other_prototype_by_the_margin():
    prototypes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    queries = prototypes + 0.1
    labels = torch.arange(3)
    assert proto_triplet_loss(queries, labels, prototypes, margin=0.5).item() == 0.0
    # margin larger than the gap d₋ − d₊ ≈ 9.9: the hinge is active and equals its mean violation
    d = torch.cdist(queries, prototypes)
    gap = torch.stack([d[i, torch.arange(3) != i].min() - d[i, i] for i in range(3)])
    torch.testing.assert_close(
        proto_triplet_loss(queries, labels, prototypes, margin=20.0, eps=0.0), (20.0 - gap).mean(), atol=1e-6, rtol=0
    )
    # all embeddings equal: d₊ = d₋, so the loss is exactly the margin
    same = torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(
        proto_triplet_loss(same, labels, same, margin=0.5), torch.tensor(0.5, dtype=torch.float64)
    )


def test_proto_triplet_equals_pytorch_metric_learning_triplet_with_query_prototype_hardest_negative_triplets():
    z = episode_embeddings(seed=3, spread=2.5)
    support, queries = SPEC.split(z)
    labels = SPEC.query_labels()
    prototypes = support.mean(1)
    ours = proto_triplet_loss(queries, labels, prototypes, margin=0.5, eps=0.0)
    # the same triplets for the library: anchors = queries, positive = own prototype, negative = nearest other one
    d = torch.cdist(queries, prototypes).masked_fill(F.one_hot(labels, SPEC.way).bool(), float("inf"))
    n_q = len(queries)
    anchors, positives, negatives = torch.arange(n_q), n_q + labels, n_q + d.argmin(1)
    library = TripletMarginLoss(margin=0.5, distance=LpDistance(normalize_embeddings=False, p=2), reducer=MeanReducer())
    theirs = library(
        torch.cat([queries, prototypes]),
        torch.cat([labels, torch.arange(SPEC.way)]),
        indices_tuple=(anchors, positives, negatives),
    )
    assert ours.item() > 0.0  # the hinge is active for some queries, so this compares something
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-6, rtol=1e-6)


def test_icnn_score_is_invariant_to_rescaling_the_embedding_up_to_its_epsilons():
    z, y = episode_embeddings(seed=1, spread=2.0), torch.cat([SPEC.support_labels(), SPEC.query_labels()])
    base = icnn_score(z, y, k=4, ipc=SPEC.shot + SPEC.query)
    assert 0.0 < base.item() < 1.0
    for scale in (0.5, 7.0, 300.0):
        torch.testing.assert_close(icnn_score(z * scale, y, k=4, ipc=SPEC.shot + SPEC.query), base, atol=1e-5, rtol=0)


def test_icnn_score_tends_to_one_for_tight_separated_clusters_and_drops_when_they_mix():
    y = torch.cat([SPEC.support_labels(), SPEC.query_labels()])
    tight = icnn_score(episode_embeddings(seed=2, spread=1e-4), y, ipc=SPEC.shot + SPEC.query)
    assert tight.item() == pytest.approx(1.0, abs=1e-3)
    loose = icnn_score(episode_embeddings(seed=2, spread=3.0), y, ipc=SPEC.shot + SPEC.query)
    shuffled = icnn_score(
        episode_embeddings(seed=2, spread=1e-4), y[torch.randperm(len(y))], ipc=SPEC.shot + SPEC.query
    )
    assert shuffled.item() < loose.item() < tight.item()
    assert 0.0 <= shuffled.item()


def test_icnn_score_ignores_how_the_classes_are_numbered_and_has_gradient():
    z = episode_embeddings(seed=4, spread=2.0).requires_grad_()
    y = torch.cat([SPEC.support_labels(), SPEC.query_labels()])
    renamed = torch.tensor([2, 0, 3, 1])[y]
    score = icnn_score(z, y, ipc=8)
    torch.testing.assert_close(icnn_score(z, renamed, ipc=8), score)
    (-score.log()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_episodic_loss_averages_its_active_terms():
    z = episode_embeddings(seed=5, spread=2.0)
    parts = EpisodicLoss(SPEC, ("ce", "proto-triplet", "icnn")).parts(z)
    assert set(parts) == {"ce", "proto-triplet", "icnn"}
    model = torch.nn.Identity()
    total = EpisodicLoss(SPEC, ("ce", "proto-triplet", "icnn"))(model, z, torch.zeros(len(z), dtype=torch.long))
    torch.testing.assert_close(total, sum(parts.values()) / 3)
    support_only = EpisodicLoss(SPEC, ("icnn",), icnn_on="support").parts(z)["icnn"]
    flat_support = SPEC.split(z)[0].reshape(-1, z.shape[1])
    torch.testing.assert_close(support_only, -icnn_score(flat_support, SPEC.support_labels()).log())


def test_episode_sampler_draws_class_major_episodes_of_distinct_examples_reproducibly():
    y = torch.arange(6).repeat_interleave(30)[torch.randperm(180, generator=torch.Generator().manual_seed(0))]
    sampler = EpisodeSampler(SPEC, episodes=5)
    first = sampler(y, 0, torch.Generator().manual_seed(1))
    again = sampler(y, 0, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 5
    for index in first:
        assert len(index) == SPEC.size and len(set(index.tolist())) == SPEC.size
        support, queries = SPEC.split(y[index][:, None])
        classes = support[:, 0, 0]
        assert len(set(classes.tolist())) == SPEC.way and torch.all(support.squeeze(-1) == classes[:, None])
        assert torch.equal(queries.squeeze(1), classes.repeat_interleave(SPEC.query))


def test_episode_evaluation_is_perfect_on_separated_clusters_and_reports_a_ci():
    y = torch.arange(5).repeat_interleave(40)
    z = F.one_hot(y, 5).double() * 10 + 0.01 * torch.randn(200, 5, dtype=torch.float64)
    ev = evaluate_episodes(z, y, EpisodeSpec(5, 1, 15), episodes=30, seed=0)
    assert ev.mean == 1.0 and ev.logits.shape == (30 * 75, 5) and ev.labels.shape == (30 * 75,)
    mean, half = mean_ci95(np.array([0.5, 0.7, 0.6, 0.8]))
    assert mean == pytest.approx(0.65) and half == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.8], ddof=1) / 2)


def test_few_shot_split_holds_the_novel_classes_out_of_training():
    data = few_shot_split(load_builtin("digits"), novel_classes=5)
    assert set(data.y_train.tolist()) == set(range(5)) and data.num_classes == 5
    assert set(data.y_test.tolist()) == set(range(5)) and set(data.y_val.tolist()) == set(range(5))
    train_rows = {tuple(r) for r in data.x_train.flatten(1).numpy().round(4).tolist()}
    assert not any(tuple(r) in train_rows for r in data.x_test.flatten(1).numpy().round(4).tolist()[:100])


def test_run_logs_few_shot_accuracy_calibration_checkpoints_and_plots():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast_params())
    assert [s for s, _ in ctx.history("val_acc")] == [1, 2]
    for k in (1, 5):
        assert 0.2 < ctx.latest(f"test_acc_{k}shot") <= 1.0
        assert ctx.latest(f"test_ci95_{k}shot") > 0 and 0 <= ctx.latest(f"test_ece_{k}shot") <= 1
    assert len(ctx.checkpoints) == 2
    for name in ("curves.png", "reliability.png"):
        kind, png = ctx.artifacts[name]
        assert kind == "plot" and png.startswith(b"\x89PNG")


def test_resumed_run_ends_identical_to_an_uninterrupted_one():
    from tests.unit.resumption import interrupted_and_resumed

    whole, crashed, resumed = interrupted_and_resumed(
        run, load_builtin("digits"), fast_params(epochs=3), seed=2, stop_after=2
    )
    assert crashed.latest("test_acc_5shot") is None
    assert [s for s, _ in resumed.history("train_loss")] == [3]
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("test_acc_5shot") == whole.latest("test_acc_5shot")


def test_wider_episodes_than_classes_are_refused_and_cancel_is_prompt():
    with pytest.raises(ValueError, match="6-way"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), fast_params(way=6))
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    ctx.on_progress = lambda done, total, message: ctx.cancel()
    assert not registered_spec(run).invoke(ctx, fast_params(epochs=1000))
    assert ctx.progress_state[0] <= 1 and not ctx.artifacts
