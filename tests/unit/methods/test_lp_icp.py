"""LP-ICP (Maltoudoglou et al., Pattern Recognition 2022): the pruned prediction sets equal brute force,
p-values are valid, coverage holds on exchangeable data, crepes agrees on the single-label case, and the
job's contract on the multi-label standard-library docstrings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.conformal import (
    LabelPowersetICP,
    PredictionSetTooLarge,
    all_label_sets,
    binary_relevance_p_values,
    binary_relevance_sets,
    icp_p_values,
    label_costs,
    label_set_scores,
    score_threshold,
    set_codes,
)
from models.context import InMemoryRunContext
from models.datasets.stdlib_docstrings import build_stdlib_docstrings
from models.methods.classification.lp_icp import LPICPParams, binomial_limit, run

torch.set_num_threads(1)


def synthetic(rng: np.random.Generator, n: int, num_labels: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable multi-label data: true label probabilities π ~ Beta(0.3, 2), Y ~ Bernoulli(π), and a
    scorer whose outputs ô are π blurred on the logit scale (a good but imperfect classifier)."""
    pi = rng.beta(0.3, 2.0, size=(n, num_labels))
    y = (rng.random((n, num_labels)) < pi).astype(np.int8)
    logit = np.log(pi + 1e-6) - np.log1p(-pi + 1e-6) + noise * rng.standard_normal(pi.shape)
    return 1 / (1 + np.exp(-logit)), y


probabilities = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
)  # ties between label sets and with α_i


@settings(max_examples=150, deadline=None)
@given(
    num_labels=st.integers(1, 10),
    probs=st.lists(probabilities, min_size=10, max_size=10),
    cal_seed=st.integers(0, 2**16),
    q=st.integers(1, 80),
    measure=st.sampled_from(["l2", "l1", "nll"]),
    epsilon=st.one_of(st.sampled_from([0.05, 0.1, 0.2, 0.5]), st.floats(0.0, 1.0)),
)
def test_pruned_prediction_sets_equal_brute_force(num_labels, probs, cal_seed, q, measure, epsilon):
    rng = np.random.default_rng(cal_seed)
    cal_probs = np.round(rng.random((q, num_labels)) * 4) / 4 if cal_seed % 2 else rng.random((q, num_labels))
    cal_sets = (rng.random((q, num_labels)) < cal_probs).astype(np.int8)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets, measure)
    x = np.asarray(probs[:num_labels])
    fast, brute = icp.predict(x, epsilon), icp.predict_brute_force(x, epsilon)
    assert fast.same_as(brute)
    assert brute.evaluations == 2**num_labels and fast.evaluations <= 2**num_labels


def test_pruned_search_scores_little_more_than_the_prediction_set():
    """Output-sensitive: the search scores the members of Γ^ε (plus Y⁰ when Γ^ε is empty), never all 2^L."""
    rng = np.random.default_rng(0)
    cal_probs, cal_sets = synthetic(rng, 300, 16)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets)
    test_probs, _ = synthetic(rng, 50, 16)
    for eps in (0.05, 0.1, 0.2):
        for x in test_probs:
            pred = icp.predict(x, eps)
            assert pred.evaluations == max(len(pred), 1)
            assert pred.evaluations < 2**16 / 10


def test_prediction_sets_are_nested_as_epsilon_grows():
    rng = np.random.default_rng(1)
    cal_probs, cal_sets = synthetic(rng, 200, 8)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets, "nll")
    for x in synthetic(rng, 20, 8)[0]:
        previous = None
        for eps in (0.01, 0.05, 0.1, 0.2, 0.4):
            codes = set(icp.predict(x, eps).codes().tolist())
            assert previous is None or codes <= previous
            previous = codes


def test_p_values_count_calibration_scores_at_least_as_large():
    cal = np.array([0.5, 1.0, 1.0, 2.0])
    p = icp_p_values(cal, np.array([0.0, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]))
    np.testing.assert_array_equal(p, (np.array([4, 4, 3, 3, 1, 1, 0]) + 1) / 5)  # (#{α_i ≥ α} + 1)/(q + 1)


def test_p_values_lie_between_one_over_q_plus_one_and_one():
    rng = np.random.default_rng(2)
    cal_probs, cal_sets = synthetic(rng, 99, 6)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets)
    for x in synthetic(rng, 10, 6)[0]:
        p = icp.predict_brute_force(x, 0.0).p_values  # ε = 0: every label set, with its p-value
        assert len(p) == 64 and p.min() >= 1 / 100 and p.max() <= 1.0
        assert np.allclose(p * 100, np.round(p * 100))


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.99, 1.0])
def test_score_threshold_is_exactly_the_p_value_cut(epsilon):
    rng = np.random.default_rng(3)
    cal = np.round(rng.random(40) * 10) / 10  # ties among the α_i
    probe = np.concatenate([cal, rng.random(200) * 1.2 - 0.1, [np.inf]])  # α is never −∞
    t = score_threshold(cal, epsilon)
    np.testing.assert_array_equal(icp_p_values(cal, probe) > epsilon, probe <= t)


def test_best_label_set_beyond_the_threshold_gives_an_empty_set():
    icp = LabelPowersetICP(np.zeros(9))  # every calibration set fitted perfectly
    pred = icp.predict(np.array([0.5, 0.5, 0.1]), epsilon=0.2)
    assert len(pred) == 0 and pred.evaluations == 1
    assert icp.predict_brute_force(np.array([0.5, 0.5, 0.1]), epsilon=0.2).same_as(pred)


def test_additive_measures_score_label_sets_as_the_paper_defines():
    probs = np.array([0.9, 0.2, 0.5])
    sets = all_label_sets(3)
    l2 = label_set_scores(*label_costs(probs, "l2"), sets)
    np.testing.assert_allclose(l2, np.linalg.norm(sets - probs, axis=1) ** 2)
    l1 = label_set_scores(*label_costs(probs, "l1"), sets)
    np.testing.assert_allclose(l1, np.abs(sets - probs).sum(1))
    nll = label_set_scores(*label_costs(probs, "nll"), sets)
    np.testing.assert_allclose(nll, -np.log(np.where(sets == 1, probs, 1 - probs)).sum(1))
    np.testing.assert_array_equal(set_codes(sets), np.arange(8))


def test_squared_euclidean_gives_the_p_values_of_the_papers_euclidean_norm():
    """p-values depend on α only through ranks, so ‖Y − ô‖₂ and its square give the same p-values and sets."""
    rng = np.random.default_rng(8)
    cal_probs, cal_sets = synthetic(rng, 200, 8)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets, "l2")
    norms = np.linalg.norm(cal_sets - cal_probs, axis=1)
    for x in synthetic(rng, 20, 8)[0]:
        candidates = all_label_sets(8)
        np.testing.assert_array_equal(
            icp.predict_brute_force(x, 0.0).p_values, icp_p_values(norms, np.linalg.norm(candidates - x, axis=1))
        )


def test_papers_hamming_ball_bound_contains_the_prediction_set():
    rng = np.random.default_rng(9)
    icp = LabelPowersetICP.calibrate(*synthetic(rng, 200, 14))
    for x in synthetic(rng, 30, 14)[0]:
        pred = icp.predict(x, 0.1)
        best = (x > 0.5).astype(np.int8)
        radius = int((pred.label_sets != best).sum(1).max()) if len(pred) else 0
        assert sum(math.comb(14, j) for j in range(radius + 1)) <= pred.hamming_ball_sets
        assert len(pred) <= pred.hamming_ball_sets <= 2**14


def test_too_large_a_prediction_set_is_refused_not_enumerated():
    icp = LabelPowersetICP(np.full(20, 30.0))
    with pytest.raises(PredictionSetTooLarge):
        icp.predict(np.full(40, 0.5), epsilon=0.1, limit=1000)


@pytest.mark.parametrize("measure", ["l2", "l1", "nll"])
@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.2])
def test_coverage_is_valid_and_tight_on_exchangeable_data(measure, epsilon):
    """ICP's error rate equals ⌊ε(q+1)⌋/(q+1) ≤ ε in expectation over calibration sets (continuous scores):
    the mean over 20 calibration draws sits within 3 standard errors of it, each draw within its tolerance."""
    rng = np.random.default_rng(4)
    q, n, draws, num_labels = 199, 2000, 20, 12
    errors = []
    for _ in range(draws):
        icp = LabelPowersetICP.calibrate(*synthetic(rng, q, num_labels), measure=measure)
        test_probs, test_sets = synthetic(rng, n, num_labels)
        error = float((icp.p_values(test_probs, test_sets) <= epsilon).mean())
        assert error <= binomial_limit(epsilon, n, q)
        errors.append(error)
    expected = math.floor(epsilon * (q + 1)) / (q + 1)
    se = math.sqrt(epsilon * (1 - epsilon) * (1 / n + 1 / (q + 1)) / draws)
    assert abs(np.mean(errors) - expected) <= 3 * se


def test_membership_in_the_prediction_set_is_exactly_p_above_epsilon():
    rng = np.random.default_rng(5)
    icp = LabelPowersetICP.calibrate(*synthetic(rng, 150, 20))
    probs, sets = synthetic(rng, 200, 20)
    p_true = icp.p_values(probs, sets)
    for eps in (0.05, 0.2):
        inside = np.array([icp.predict(x, eps).contains(y) for x, y in zip(probs, sets)])
        np.testing.assert_array_equal(inside, p_true > eps)


def test_single_label_lp_icp_agrees_with_crepes_conformal_classifier():
    """L = 1: label powerset is a binary ICP, and α = |Y − ô| is crepes' hinge score 1 − P̂(Y)."""
    crepes = pytest.importorskip("crepes")
    from crepes.extras import hinge

    rng = np.random.default_rng(6)
    cal_probs, cal_sets = synthetic(rng, 301, 1, noise=0.5)
    test_probs, _ = synthetic(rng, 500, 1, noise=0.5)
    as_classes = lambda p: np.hstack([1 - p, p])  # noqa: E731 — columns P̂(Y=0), P̂(Y=1)
    cc = crepes.ConformalClassifier().fit(hinge(as_classes(cal_probs), np.array([0, 1]), cal_sets[:, 0]))
    p_crepes = cc.predict_p(hinge(as_classes(test_probs)), smoothing=False)
    icp = LabelPowersetICP.calibrate(cal_probs, cal_sets)
    ours = np.stack([icp.p_values(test_probs, np.full((500, 1), y)) for y in (0, 1)], axis=1)
    np.testing.assert_allclose(ours, p_crepes, rtol=0, atol=1e-12)
    epsilon = 0.1 + 0.5 / 302  # off the p-value grid: crepes keeps p ≥ ε, the ICP definition p > ε
    sets_crepes = cc.predict_set(hinge(as_classes(test_probs)), confidence=1 - epsilon, smoothing=False)
    for x, row in zip(test_probs, sets_crepes):
        members = icp.predict(x, epsilon).label_sets[:, 0]
        np.testing.assert_array_equal(np.isin([0, 1], members).astype(int), row)


def test_binary_relevance_baseline_is_valid_and_a_product_of_label_sets():
    pytest.importorskip("crepes")
    rng = np.random.default_rng(7)
    cal_probs, cal_sets = synthetic(rng, 300, 6)
    test_probs, test_sets = synthetic(rng, 1500, 6)
    br = binary_relevance_sets(binary_relevance_p_values(cal_probs, cal_sets, test_probs), 0.1)
    assert 1 - br.covers(test_sets).mean() <= binomial_limit(0.1, 1500, 300)
    np.testing.assert_array_equal(br.sizes(), br.allowed.sum(2).prod(1))


@pytest.fixture(scope="module")
def small_docstrings():
    """The first 50 standard-library files' docstrings, 6 labels: the real builder in a few seconds."""
    return build_stdlib_docstrings(num_labels=6, max_files=50)


def test_stdlib_docstrings_is_a_deterministic_multi_label_text_set(small_docstrings):
    first, again = small_docstrings, build_stdlib_docstrings(num_labels=6, max_files=50)
    names = {s: set(split["name"]) for s, split in first}
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
    for s, split in first:
        labels = split["labels"]
        assert labels.shape == (len(split["text"]), 6) and labels.dtype == np.int8
        assert labels.sum(1).min() >= 1 and all(t.startswith(("def ", "class ")) for t in split["text"])
        np.testing.assert_array_equal(labels, again.splits[s]["labels"])
        assert split["text"] == again.splits[s]["text"]
    stacked = np.concatenate([split["labels"] for _, split in first])
    assert (stacked.sum(1) >= 2).mean() > 0.1  # genuinely multi-label
    assert np.all(np.diff(stacked.sum(0)) <= 0)  # labels are the most used modules, most used first


def test_run_trains_calibrates_and_reports_sets_identical_to_brute_force(small_docstrings):
    ctx = InMemoryRunContext(dataset=small_docstrings, seed=0)
    run(ctx, LPICPParams(embedder="tfidf", epochs=3, hidden=32, epsilons=[0.1, 0.2]))
    assert {"calibration.png", "prediction_sets.json"} <= set(ctx.artifacts)
    rows = json.loads(ctx.artifacts["prediction_sets.json"][1])["rows"]
    assert [r["epsilon"] for r in rows] == [0.1, 0.2]
    assert all(r["identical_to_brute_force"] == 1.0 and r["evaluations"] <= 64 for r in rows)
    assert ctx.latest("error") is not None and "lp-icp" in ctx.models
