"""ECAML (Chen & Deng, AAAI 2019): the energy-confusion term's invariants and the run's contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation.ecaml import ECAMLParams, MetricEmbedder, energy_confusion, run
from models.representation.zero_shot import class_balanced_batch
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)


@pytest.mark.parametrize("a", [0.1, 3.0, 250.0])
def test_energy_confusion_shifts_by_two_log_a_when_features_scale_by_a(batch, a):
    f, y = batch
    base = energy_confusion(f, y, 10, torch.Generator().manual_seed(5))
    scaled = energy_confusion(a * f, y, 10, torch.Generator().manual_seed(5))
    assert float(scaled - base) == pytest.approx(2 * math.log(a), abs=1e-9)


def test_energy_confusion_matches_a_slow_pair_loop(batch):
    f, y = batch
    value = energy_confusion(f, y, 4, torch.Generator().manual_seed(1))
    offset = torch.randint(1, 24, (24, 4), generator=torch.Generator().manual_seed(1))  # the same draws
    pairs = [(i, (i + int(o)) % 24) for i in range(24) for o in offset[i]]
    n_pos = sum(int(y[i] == y[j]) for i, j in pairs)
    n_neg = len(pairs) - n_pos
    energy = sum(0.5 * float((f[i] - f[j]).pow(2).sum()) / (n_pos if y[i] == y[j] else n_neg) for i, j in pairs)
    assert all(i != j for i, j in pairs)
    assert float(value) == pytest.approx(math.log(energy), rel=1e-12)


def test_confusion_gradient_reaches_the_embedding_layer_but_not_the_backbone():
    torch.manual_seed(0)
    model = MetricEmbedder(width=8, embedding_dim=16, image_size=8)
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 4
    _, f_ec = model(x)
    energy_confusion(f_ec, y, 5, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.body.parameters())
    assert model.embedding.weight.grad.abs().sum() > 0


def test_class_balanced_batches_hold_m_images_of_each_of_k_classes():
    y = torch.arange(100) % 5
    index = class_balanced_batch(y, 3, 7, torch.Generator().manual_seed(0))
    counts = torch.bincount(y[index], minlength=5)
    assert sorted(counts.tolist()) == [0, 0, 7, 7, 7]


def fast(**overrides: object) -> ECAMLParams:
    return ECAMLParams(
        **{
            "iterations": 6,
            "eval_every": 2,
            "checkpoint_every": 2,
            "width": 8,
            "embedding_dim": 16,
            "samples_per_class": 6,
            "plot": "pca",
            **overrides,
        }
    )


def test_run_trains_on_seen_classes_scores_unseen_ones_and_saves_plots():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast())
    assert [s for s, _ in ctx.history("unseen_recall_at_1")] == [2, 4, 6, 6]  # the last: the final evaluation
    assert 0.2 < ctx.latest("unseen_recall_at_1") <= 1.0 and 0.0 <= ctx.latest("unseen_nmi") <= 1.0
    assert ctx.latest("energy_confusion") is not None and ctx.load_checkpoint().step == 6
    for name in ("curves.png", "unseen_embedding.png"):
        assert ctx.artifacts[name][1].startswith(b"\x89PNG")
    assert ctx.progress_state[:2] == (6, 6)
    report = json.loads(ctx.artifacts["report.json"][1])
    assert report["unseen_recall_at_1"] == ctx.latest("unseen_recall_at_1") and "unseen_map_at_r" in report


def test_resumed_run_ends_identical_and_a_cancelled_run_publishes_nothing():
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), fast(), seed=3, stop_after=4)
    assert crashed.load_checkpoint().step == 4 and "report.json" not in crashed.artifacts
    assert [s for s, _ in crashed.history("unseen_recall_at_1")] == [2, 4]  # stopped before the next evaluation
    assert resumed.history("unseen_recall_at_1") == whole.history("unseen_recall_at_1")[2:]
    assert resumed.latest("energy_confusion") == whole.latest("energy_confusion")


def test_params_are_bounded():
    with pytest.raises(ValidationError):
        ECAMLParams(ec_weight=-0.1)
    with pytest.raises(ValidationError):
        ECAMLParams(loss="arcface")
    with pytest.raises(ValueError, match="unseen"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), fast(seen_classes=10))
