"""Naive Bayes vs logistic regression (Zheng et al., ICML 2023): the shared-variance NB and the analysis run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.naive_bayes import GaussianNB

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.gen_vs_disc import (
    GenVsDiscParams,
    SharedVarianceGaussianNB,
    coordinate_variance,
    gaussian_class_means,
    gaussian_sample,
    oracle_error,
    per_class_grid,
    run,
)
from models.registry import registered_spec

torch.set_num_threads(1)


@pytest.fixture
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Three classes with very different spreads, so per-class and shared variances disagree."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = rng.normal(size=(600, 5)) * np.array([0.3, 1.0, 3.0])[y][:, None] + y[:, None] * 1.5
    return x, y


def test_nb_logits_are_linear_in_x(blobs):
    x, y = blobs
    nb = SharedVarianceGaussianNB(3).fit(x, y)
    var, mu = nb.variance, nb.mean
    prior = nb.count / nb.count.sum()
    np.testing.assert_allclose(nb.coef_, mu / var)
    np.testing.assert_allclose(nb.intercept_, np.log(prior) - 0.5 * ((mu / np.sqrt(var)) ** 2).sum(1))
    # the Gaussian log joint differs from the linear logits by a term that is the same for every class
    log_joint = np.log(prior) - 0.5 * (((x[:, None] - mu[None]) ** 2) / var).sum(-1)
    np.testing.assert_allclose(
        nb.decision_function(x), log_joint + 0.5 * ((x**2) / var).sum(1, keepdims=True), rtol=1e-10, atol=1e-8
    )


def test_streaming_fit_equals_batch_fit(blobs):
    x, y = blobs
    batch = SharedVarianceGaussianNB(3).fit(x, y)
    stream = SharedVarianceGaussianNB(3)
    first = y[:200] != 2  # one chunk without class 2
    stream.partial_fit(x[:200][first], y[:200][first]).partial_fit(x[:200][~first], y[:200][~first])
    stream.partial_fit(x[200:450], y[200:450]).partial_fit(x[450:], y[450:])
    np.testing.assert_array_equal(stream.count, batch.count)
    np.testing.assert_allclose(stream.mean, batch.mean, rtol=1e-12)
    np.testing.assert_allclose(stream.variance, batch.variance, rtol=1e-12)
    np.testing.assert_array_equal(stream.predict(x), batch.predict(x))


def test_pooled_variance_is_not_sklearns_per_class_model(blobs):
    x, y = blobs
    ours = SharedVarianceGaussianNB(3).fit(x, y)
    sk = GaussianNB(var_smoothing=1e-9).fit(x, y)
    per_class = sk.var_ - sk.epsilon_
    assert not np.allclose(per_class[0], per_class[2], rtol=0.5)  # sklearn keeps one variance per class
    np.testing.assert_allclose(ours.variance - 1e-9, (sk.class_prior_[:, None] * per_class).sum(0), rtol=1e-8)
    np.testing.assert_allclose(ours.mean, sk.theta_, rtol=1e-10)
    assert (ours.predict(x) != sk.predict(x)).any()
    # along a line x(t) = a + t·d, our log-odds are linear in t; sklearn's are quadratic
    a, d = x[0], np.ones(5)
    line = a + np.linspace(-3, 3, 7)[:, None] * d
    ours_gap = ours.decision_function(line)[:, 2] - ours.decision_function(line)[:, 0]
    sk_gap = sk.predict_joint_log_proba(line)[:, 2] - sk.predict_joint_log_proba(line)[:, 0]
    assert np.abs(np.diff(ours_gap, 2)).max() < 1e-8
    assert np.abs(np.diff(sk_gap, 2)).max() > 1e-2


def test_simulation_follows_the_papers_generator():
    np.testing.assert_array_equal(gaussian_class_means(5, 2)[:, 0], [-1, 1, 2, 4, 8])
    np.testing.assert_array_equal(coordinate_variance(4), [4, 4, 1, 1])
    x, y = gaussian_sample(2, 100, 3000, np.random.default_rng(0))
    np.testing.assert_allclose(x[y == 1].var(0)[:50].mean(), 100, rtol=0.05)
    assert oracle_error(2, 100, x, y) < 1e-3  # Bayes error is ~0 at n = 100, as the paper's table says
    assert per_class_grid(20) == [1, 2, 3, 4, 6, 8, 11, 16]


def test_run_logs_error_per_training_size_and_saves_curve_and_table():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, GenVsDiscParams(shots=[1, 5], repeats=2))
    assert [s for s, _ in ctx.history("nb_error")] == [10, 50]
    assert all(0.0 <= e <= 1.0 for _, e in ctx.history("lr_error"))
    kind, blob = ctx.artifacts["learning_curve.json"]
    table = json.loads(blob)
    assert kind == "table" and [r["shots"] for r in table["rows"]] == [1, 5] and table["feature_dim"] == 64
    assert ctx.artifacts["learning_curve.png"][1].startswith(b"\x89PNG")


def test_cnn_features_come_from_a_held_out_half_and_need_images():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, GenVsDiscParams(features="cnn", cnn_epochs=1, cnn_width=8, shots=[2], repeats=1))
    assert json.loads(ctx.artifacts["learning_curve.json"][1])["feature_dim"] == 8
    with pytest.raises(ValueError, match="image"):
        run(InMemoryRunContext(dataset=load_builtin("synthetic-tabular")), GenVsDiscParams(features="cnn"))


def test_cancelled_analysis_stops_without_artifacts():
    ctx = InMemoryRunContext(dataset=load_builtin("synthetic-tabular"), seed=0)
    ctx.on_progress = lambda done, total, message: ctx.cancel()
    assert not registered_spec(run).invoke(ctx, GenVsDiscParams(shots=[1, 2, 3], repeats=2))
    assert len(ctx.history("nb_error")) == 1 and not ctx.artifacts
