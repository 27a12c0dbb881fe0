"""Unsupervised pretraining (factor model): exact excess risk, rotation invariance, the advantage, the run."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group
from sklearn.linear_model import Ridge

from models.context import InMemoryRunContext
from models.methods.classification.unsup_pretrain import (
    FactorModel,
    UnsupPretrainParams,
    excess_risk_curves,
    pretrain,
    run,
)


@pytest.fixture
def model() -> FactorModel:
    return FactorModel.random(d=20, r=3, noise=1.0, label_noise=0.2, rng=np.random.default_rng(0))


def test_exact_excess_risk_is_zero_for_the_bayes_predictor_and_matches_monte_carlo(model):
    cov_x = model.loadings @ model.loadings.T + np.eye(20)
    w_bayes = np.linalg.solve(cov_x, model.loadings @ model.theta)
    assert model.excess_risk(lambda q: q @ w_bayes) == pytest.approx(0.0, abs=1e-10)
    w = w_bayes + 0.05 * np.random.default_rng(1).normal(size=20)
    x, y = model.sample(400_000, np.random.default_rng(2))
    mc = np.mean((y - x @ w - 0.1) ** 2) - np.mean((y - x @ w_bayes) ** 2)
    assert model.excess_risk(lambda q: q @ w + 0.1) == pytest.approx(mc, rel=0.03)


def test_second_stage_predictions_are_invariant_to_rotating_the_learned_latent(model):
    rng = np.random.default_rng(3)
    fa = pretrain(model.sample(3000, rng)[0], 3, seed=0)
    x, y = model.sample(50, rng)
    q = ortho_group.rvs(3, random_state=4)
    x_test = model.sample(100, rng)[0]
    plain = Ridge(alpha=1.0).fit(fa.transform(x), y).predict(fa.transform(x_test))
    rotated = Ridge(alpha=1.0).fit(fa.transform(x) @ q, y).predict(fa.transform(x_test) @ q)
    np.testing.assert_allclose(rotated, plain, rtol=1e-8, atol=1e-10)


def test_pretraining_beats_supervised_learning_when_labels_are_few():
    params = UnsupPretrainParams(dim=60, latent_dim=3, unlabeled=3000, labeled=[10, 30], repeats=2)
    curves = excess_risk_curves(params, seed=0)
    ours, base = curves["two-stage (MLE + ERM)"].mean(0), curves["supervised"].mean(0)
    assert np.all(ours * 3 < base)
    assert np.all(ours >= 0) and np.all(base >= 0)


def test_run_logs_one_point_per_label_budget_and_saves_the_curve():
    ctx = InMemoryRunContext(seed=0)
    run(ctx, UnsupPretrainParams(dim=30, latent_dim=2, unlabeled=1000, labeled=[10, 40], repeats=1))
    assert [s for s, _ in ctx.history("excess_risk_two_stage")] == [10, 40]
    kind, png = ctx.artifacts["excess_risk.png"]
    assert kind == "plot" and png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="latent_dim"):
        run(InMemoryRunContext(), UnsupPretrainParams(dim=5, latent_dim=5))
