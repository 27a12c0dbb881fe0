"""MLCD (An et al., ECCV 2024): the separated multi-label loss's invariants, sampling, the run's contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.datasets import load_builtin
from models.methods.representation.mlcd import (
    MLCDParams,
    cluster_labels,
    run,
    sample_classes,
    separated_multilabel_loss,
    softmax_multipositive_loss,
)
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 12, generator=g, dtype=torch.float64) * 2 - 1
    positives = torch.zeros(6, 12, dtype=torch.bool)
    positives[torch.arange(6)[:, None], torch.randint(0, 12, (6, 3), generator=g)] = True
    return cos, positives


def test_loss_is_exactly_a_positive_term_plus_a_negative_term(batch):
    cos, pos = batch
    s = 5.0
    expected = (
        sum(
            math.log(1 + sum(math.exp(s * float(c)) for c, p in zip(cos[i], pos[i]) if not p))
            + math.log(1 + sum(math.exp(-s * float(c)) for c, p in zip(cos[i], pos[i]) if p))
            for i in range(6)
        )
        / 6
    )
    assert float(separated_multilabel_loss(cos, pos, s)) == pytest.approx(expected, rel=1e-12)


def test_loss_decreases_in_positive_cosines_and_increases_in_negative_ones(batch):
    cos, pos = batch
    cos = cos.clone().requires_grad_()
    separated_multilabel_loss(cos, pos, 8.0).backward()
    assert torch.all(cos.grad[pos] < 0) and torch.all(cos.grad[~pos] > 0)


def test_positives_do_not_compete_unlike_the_softmax(batch):
    cos, pos = batch
    raised = cos.clone()
    first = pos[0].nonzero()[0, 0]
    raised[0, first] += 0.5  # one positive more similar: the other positives' part must not get worse
    sep = lambda c: separated_multilabel_loss(c[:1], pos[:1], 8.0)  # noqa: E731
    soft = lambda c: softmax_multipositive_loss(c[:1], pos[:1], 8.0)  # noqa: E731
    assert sep(raised) < sep(cos)
    others = pos[0].clone()
    others[first] = False
    if others.any():
        assert softmax_multipositive_loss(raised[:1], others[None], 8.0) > softmax_multipositive_loss(
            cos[:1], others[None], 8.0
        )
        assert separated_multilabel_loss(
            raised[:1], others[None], 8.0, keep=others[None] | ~pos[:1]
        ) <= separated_multilabel_loss(cos[:1], others[None], 8.0, keep=others[None] | ~pos[:1])
    assert soft(cos) > 0


def test_negative_sampling_keeps_every_positive(batch):
    _, pos = batch
    keep = sample_classes(pos, 0.0, torch.Generator().manual_seed(0))
    assert torch.all(keep[pos]) and torch.equal(keep[0], pos.any(0))


def test_run_logs_map_checkpoints_and_resumes_identically():
    params = MLCDParams(
        mosaics=200, clusters=10, epochs=3, width=8, embedding_dim=8, batch_size=64, checkpoint_every=1, plot="pca"
    )
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), params, seed=0, stop_after=2)
    assert 0.0 < whole.latest("digit_presence_map") <= 1.0
    assert whole.artifacts["curves.png"][1].startswith(b"\x89PNG")
    assert whole.artifacts["embedding.png"][1].startswith(b"\x89PNG")
    assert crashed.load_checkpoint().step == 2 and "report.json" not in crashed.artifacts
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("digit_presence_map") == whole.latest("digit_presence_map")


def test_cluster_labels_work_with_fewer_mosaics_than_pca_components():
    images = torch.rand(50, 1, 8, 16, generator=torch.Generator().manual_seed(0))
    labels = cluster_labels(images, clusters=5, nearest=2, seed=0)
    assert labels.shape == (50, 5) and labels.sum(1).tolist() == [2] * 50


def test_params_are_bounded():
    with pytest.raises(ValidationError):
        MLCDParams(nearest=0)
    with pytest.raises(ValidationError):
        MLCDParams(negative_ratio=0.0)
