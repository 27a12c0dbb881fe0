"""LDR-KL / ALDR-KL (Zhu, Ying & Yang, ICML 2023): closed-form invariants, λ adaptation, the run's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.label_noise import inject_label_noise
from models.methods.classification.ldr import (
    ALDRKL,
    LDRKL,
    LDRParams,
    aldr_lambda,
    kl_to_uniform,
    ldr_kl,
    margin_gaps,
    run,
)
from models.registry import registered_spec
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)
K = 7


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, K, generator=g, dtype=torch.float64) * 3, torch.randint(0, K, (32,), generator=g)


def fast_params(**overrides: object) -> LDRParams:
    return LDRParams(**{"hidden": 32, "epochs": 6, "batch_size": 128, "checkpoint_every": 2, **overrides})


@pytest.mark.parametrize("lam", [0.3, 1.0, 10.0])
def test_ldr_kl_without_margin_or_normalisation_is_shifted_temperature_scaled_ce(batch, lam):
    z, y = batch
    loss = LDRKL(margin=0.0, lam=lam, normalize="none")(z, y)
    expected = lam * (F.cross_entropy(z / lam, y) - math.log(K))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.05, 1.0, 50.0])
def test_ldr_kl_lies_between_max_gap_minus_lambda_log_k_and_max_gap(batch, lam):
    z, y = batch
    gaps = margin_gaps(z, y, margin=0.5)
    value, worst = ldr_kl(gaps, lam), gaps.max(dim=1).values
    assert torch.all(value <= worst + 1e-12)
    assert torch.all(value >= worst - lam * math.log(K) - 1e-12)


def test_small_lambda_approaches_crammer_singer_and_large_lambda_the_mean(batch):
    z, y = batch
    gaps = margin_gaps(z, y, margin=1.0)
    crammer_singer = gaps.max(dim=1).values  # max_k (z_k − z_y + c·[k≠y]), ≥ 0 since the k = y gap is 0
    torch.testing.assert_close(ldr_kl(gaps, 1e-3), crammer_singer, atol=1e-2, rtol=0)
    torch.testing.assert_close(ldr_kl(gaps, 1e5), gaps.mean(dim=1), atol=1e-3, rtol=0)


def test_aldr_lambda_update_maximises_the_penalised_objective_and_stays_in_range(batch):
    z, y = batch
    lam0, alpha = 10.0, 2.0
    loss = ALDRKL(num_samples=100, lam0=lam0, alpha=alpha, normalize="none")
    index = torch.arange(32) * 3
    for scale in (0.01, 1.0, 100.0):  # near-uniform to one-hot p
        loss((z * scale).float(), y, index)
        lam = loss.lam[index]
        low, high = loss.lam_range
        assert low == pytest.approx(lam0 * (1 - 1 / alpha))
        assert torch.all((lam >= low - 1e-5) & (lam <= high + 1e-5))
    # For a fixed p the closed form is the argmax, over a fine grid, of −λ·KL − (α log K / 2λ₀)(λ − λ₀)².
    kl = kl_to_uniform(margin_gaps(z, y, 0.1), torch.full((32,), 3.0, dtype=torch.float64))
    grid = torch.linspace(0.0, 2 * lam0, 200_001, dtype=torch.float64)
    objective = -grid[None] * kl[:, None] - alpha * math.log(K) / (2 * lam0) * (grid[None] - lam0) ** 2
    torch.testing.assert_close(aldr_lambda(kl, lam0, alpha, K), grid[objective.argmax(1)], atol=2e-4, rtol=0)


def test_aldr_only_updates_visited_examples_and_evaluation_uses_lambda0(batch):
    z, y = batch
    loss = ALDRKL(num_samples=64)
    loss(z.float() * 5, y, torch.arange(32))
    assert torch.all(loss.lam[32:] == 10.0) and torch.any(loss.lam[:32] < 10.0)
    loss.eval()
    before = loss.lam.clone()
    value = loss(z.float(), y, torch.arange(32))
    assert torch.equal(loss.lam, before)
    gaps = margin_gaps(z.float() / z.float().abs().mean(1, keepdim=True), y, 0.1)
    torch.testing.assert_close(value, ldr_kl(gaps, 10.0).mean())


def test_aldr_lambda_table_is_part_of_the_loss_state():
    loss = ALDRKL(num_samples=5)
    assert torch.equal(loss.state_dict()["lam"], torch.full((5,), 10.0))


def test_label_noise_touches_only_the_requested_fraction_deterministically():
    y = np.repeat(np.arange(10), 200)
    uniform = inject_label_noise(y, 10, 0.5, "uniform", seed=3)
    assert np.array_equal(uniform, inject_label_noise(y, 10, 0.5, "uniform", seed=3))
    assert (uniform != y).mean() == pytest.approx(0.5 * 9 / 10, abs=0.03)  # a uniform draw may hit y again
    pairwise = inject_label_noise(y, 10, 0.3, "class-dependent", seed=3)
    flipped = pairwise != y
    assert flipped.mean() == pytest.approx(0.3, abs=0.03)
    assert np.array_equal(pairwise[flipped], (y[flipped] + 1) % 10)


def test_params_enforce_the_papers_ranges():
    with pytest.raises(ValidationError):
        LDRParams(noise_rate=0.95)
    with pytest.raises(ValidationError):
        LDRParams(alpha=1.0)  # λ_i could reach 0
    with pytest.raises(ValidationError):
        LDRParams(loss="hinge")


def test_run_logs_metrics_checkpoints_and_saves_a_curve_plot():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast_params(noise_rate=0.4))
    assert [s for s, _ in ctx.history("val_acc")] == list(range(1, 7))
    assert {"train_loss", "lr", "lambda_mean", "lambda_noisy", "lambda_clean"} <= {p.name for p in ctx.metrics}
    assert 0.5 < ctx.latest("test_acc") <= 1.0
    assert len(ctx.checkpoints) == 3 and ctx.load_checkpoint().step == 6
    kind, png = ctx.artifacts["curves.png"]
    assert kind == "plot" and png.startswith(b"\x89PNG")
    assert ctx.progress_state[:2] == (6, 6)


def test_tabular_dataset_trains_with_each_baseline_loss():
    ds = load_builtin("synthetic-tabular")
    for loss in ("ce", "gce", "mae", "ldr-kl"):
        ctx = InMemoryRunContext(dataset=ds, seed=1)
        run(ctx, fast_params(loss=loss, epochs=2, checkpoint_every=0))
        assert 0.0 <= ctx.latest("test_acc") <= 1.0 and not ctx.checkpoints


def test_cnn_backbone_trains_on_images_and_is_refused_for_tables():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast_params(backbone="cnn", hidden=8, epochs=1, checkpoint_every=0))
    assert ctx.latest("test_acc") is not None
    with pytest.raises(ValueError, match="image"):
        run(InMemoryRunContext(dataset=load_builtin("synthetic-tabular")), fast_params(backbone="cnn"))


def test_resumed_run_ends_identical_to_an_uninterrupted_one():
    params = fast_params(noise_rate=0.4, noise_type="class-dependent")
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), params, seed=5, stop_after=3)
    assert crashed.latest("test_acc") is None and crashed.load_checkpoint().step == 2
    assert [s for s, _ in resumed.history("train_loss")] == [3, 4, 5, 6]
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.history("lambda_mean") == whole.history("lambda_mean")[2:]
    assert resumed.latest("test_acc") == whole.latest("test_acc")


def test_cancelled_run_returns_promptly_without_results():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    ctx.on_progress = lambda done, total, message: ctx.cancel()
    assert not registered_spec(run).invoke(ctx, fast_params(epochs=1000, batch_size=8))
    assert ctx.progress_state[0] == 1  # stopped within the epoch after the cancel
    assert ctx.latest("test_acc") is None and not ctx.artifacts
