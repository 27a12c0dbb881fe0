"""Inductive conformal prediction for multi-label classification: label powerset (LP-ICP), its exact
pruned search, brute force, and the binary-relevance baseline.

Label powerset ICP (Maltoudoglou, Paisios, Lenc, Martínek, Král & Papadopoulos, "Well-calibrated
Confidence Measures for Multi-label Text Classification with a Large Number of Labels", Pattern
Recognition 122, 2022) treats each of the 2^L label sets Y ∈ {0,1}^L as one class. An underlying
scorer gives sigmoid outputs ô ∈ [0,1]^L; a nonconformity measure α(x, Y) says how strange Y is for x;
on q calibration examples (x_i, Y_i) the scores α_i = α(x_i, Y_i) give every candidate set its p-value

    p(Y) = (#{i : α_i ≥ α(x, Y)} + 1) / (q + 1),

and the prediction set at significance level ε is Γ^ε = {Y : p(Y) > ε}. If calibration and test
examples are exchangeable, P(Y_true ∉ Γ^ε) ≤ ε (Vovk, Gammerman & Shafer 2005) whatever the scorer.

The measures add a cost per label, α(x, Y) = Σ_l c_l(Y_l): `l2` is the paper's Euclidean distance
‖Y − ô‖₂ between the label set and the output vector, used squared, Σ_l (Y_l − ô_l)² (a monotone
transform: the same p-values and sets, and additive); `l1` is Σ_l |Y_l − ô_l|, the measure of the
earlier LP conformal predictor (Papadopoulos 2014); `nll` is Σ_l −log P̂(Y_l), the negative
log-likelihood of Y under independent sigmoid outputs (ours). The paper's text was not at hand: that it
uses the Euclidean norm, and how its pruning works, come from Katsios & Papadopoulos (COPA 2025, §2),
who summarise it. Any such measure is minimised by Y⁰ = the cheaper value of every label, and flipping label l away from
Y⁰_l adds δ_l = |c_l(1) − c_l(0)| ≥ 0. Because p is non-increasing in α, p(Y) > ε exactly when
α(x, Y) ≤ t_ε, the largest calibration score whose p-value exceeds ε (`score_threshold`). So:

1. elimination: a label with δ_l > t_ε − α(Y⁰) can never be flipped in a set of Γ^ε, so it is fixed
   to Y⁰_l, leaving the "uncertain" labels F (ô near ½). The paper (as summarised) bounds the number
   of flips instead: with the δ sorted, the cumulative sum reaches the budget t_ε − α(Y⁰) after k terms,
   so Γ^ε lies within Hamming distance k of Y⁰ — Σ_{j≤k} C(L, j) candidate sets (`hamming_ball_sets`);
2. the pruned search (`predict`): a depth-first walk over subsets of F in ascending δ, cut as soon
   as α(Y⁰) + Σ δ exceeds t_ε (every later label costs more). It visits exactly the sets of Γ^ε
   (each once) and nothing else, instead of the 2^L of brute force or the 2^|F| of elimination
   followed by enumeration.

Both searches decide membership with the same `label_set_scores` sum and threshold as brute force,
so their sets are identical, not just close (the unit tests check it against `predict_brute_force`).
Binary relevance (Lambrou & Papadopoulos 2016) is the baseline: an ICP per label at level ε/L
(Bonferroni, so the product set is valid jointly), whose prediction set is the product of the
per-label sets — 2^(number of undecided labels) label sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

Measure = Literal["l2", "l1", "nll"]
MEASURES: tuple[str, ...] = ("l2", "l1", "nll")
_PROB_FLOOR = 1e-6  # keeps −log P̂ finite for saturated sigmoids
_TOLERANCE = 1e-9  # slack for the search's running sums: they only prune, never decide membership


class PredictionSetTooLarge(RuntimeError):
    """Γ^ε has more label sets than the caller allowed (ε too small for so many uncertain labels)."""


def label_costs(probs: np.ndarray, measure: Measure = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Per-label costs (c_l(0), c_l(1)) of the additive measure α(x, Y) = Σ_l c_l(Y_l); same shape as `probs`."""
    probs = np.asarray(probs, dtype=np.float64)
    if measure == "l2":
        return probs**2, (1.0 - probs) ** 2
    if measure == "l1":
        return probs, 1.0 - probs
    if measure == "nll":
        p = np.clip(probs, _PROB_FLOOR, 1.0 - _PROB_FLOOR)
        return -np.log1p(-p), -np.log(p)
    raise ValueError(f"unknown nonconformity measure {measure!r}; use one of {MEASURES}")


def label_set_scores(cost0: np.ndarray, cost1: np.ndarray, label_sets: np.ndarray) -> np.ndarray:
    """α of each row of `label_sets` [M, L] (0/1) for one example's costs [L] — the one sum every search uses."""
    return np.where(np.asarray(label_sets, dtype=bool), cost1, cost0).sum(axis=-1)


def nonconformity(probs: np.ndarray, label_sets: np.ndarray, measure: Measure = "l2") -> np.ndarray:
    """α(x_i, Y_i) for rows of probabilities [N, L] and their label sets [N, L]."""
    cost0, cost1 = label_costs(probs, measure)
    return np.where(np.asarray(label_sets, dtype=bool), cost1, cost0).sum(axis=-1)


def icp_p_values(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Non-smoothed ICP p-values (#{i: α_i ≥ α} + 1)/(q + 1), in [1/(q+1), 1], for an array of scores α."""
    ordered = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, np.asarray(scores, dtype=np.float64), side="left")
    return (at_least + 1) / (len(ordered) + 1)


def score_threshold(calibration_scores: np.ndarray, epsilon: float) -> float:
    """t_ε: p(α) > ε ⇔ α ≤ t_ε. The largest calibration score whose p-value exceeds ε (computed with
    `icp_p_values` itself, so the equivalence is exact), +∞ if even scores above every α_i do, −∞ if none."""
    ordered = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    if 1.0 / (len(ordered) + 1) > epsilon:
        return float("inf")
    keep = ordered[icp_p_values(ordered, ordered) > epsilon]
    return float(keep[-1]) if len(keep) else float("-inf")


@lru_cache(maxsize=4)
def all_label_sets(num_labels: int) -> np.ndarray:
    """Every Y ∈ {0,1}^L as rows [2^L, L] (read-only, built once per L); row k is the binary code of k."""
    codes = np.arange(2**num_labels, dtype=np.int64)
    sets = ((codes[:, None] >> np.arange(num_labels)) & 1).astype(np.int8)
    sets.flags.writeable = False
    return sets


def set_codes(label_sets: np.ndarray) -> np.ndarray:
    """Integer code Σ_l Y_l·2^l of each row (L ≤ 62)."""
    label_sets = np.asarray(label_sets, dtype=np.int64)
    return label_sets @ (np.int64(1) << np.arange(label_sets.shape[-1], dtype=np.int64))


@dataclass(frozen=True)
class PredictionSet:
    """Γ^ε for one example: its label sets [M, L], their p-values, and how many label sets were scored."""

    label_sets: np.ndarray
    p_values: np.ndarray
    evaluations: int
    uncertain_labels: int  # |F|: labels left free by elimination
    hamming_ball_sets: float  # candidates of the paper's bound: label sets within k flips of Y⁰

    def __len__(self) -> int:
        return len(self.label_sets)

    def codes(self) -> np.ndarray:
        return np.sort(set_codes(self.label_sets))

    def same_as(self, other: PredictionSet) -> bool:
        """The same label sets with the same p-values (order aside)."""
        mine, theirs = set_codes(self.label_sets), set_codes(other.label_sets)
        a, b = np.argsort(mine, kind="stable"), np.argsort(theirs, kind="stable")
        return bool(np.array_equal(mine[a], theirs[b]) and np.array_equal(self.p_values[a], other.p_values[b]))

    def contains(self, label_set: np.ndarray) -> bool:
        return bool((self.label_sets == np.asarray(label_set, dtype=np.int8)).all(axis=1).any())


def _subsets_within_budget(delta: np.ndarray, budget: float, limit: int) -> np.ndarray:
    """Every subset of the ascending costs `delta` whose sum is ≤ budget, as rows of a 0/1 matrix [M, len(delta)].

    The depth-first search's tree walked a level (subset size) at a time, vectorised: a subset is only
    extended by labels after its last one (so each subset is produced once), and only by those that fit
    the remaining budget — a prefix of the later labels, found by binary search since δ is ascending."""
    level = np.zeros((1, len(delta)), dtype=np.int8)
    last, total = np.array([-1]), np.array([0.0])
    levels, count = [level], 1
    while len(last):
        first = last + 1
        fits = np.searchsorted(delta, budget - total, side="right")  # labels < fits are affordable
        children = np.maximum(fits - first, 0)
        if not children.any():
            break
        parent = np.repeat(np.arange(len(last)), children)
        offset = np.arange(len(parent)) - np.repeat(np.cumsum(children) - children, children)
        last = first[parent] + offset
        total = total[parent] + delta[last]
        level = level[parent]
        level[np.arange(len(parent)), last] = 1
        levels.append(level)
        count += len(parent)
        if count > limit:
            raise PredictionSetTooLarge(f"more than {limit} label sets within the threshold")
    return np.concatenate(levels)


@dataclass
class LabelPowersetICP:
    """An LP-ICP fitted on calibration outputs: `predict` (pruned, exact) and `predict_brute_force` (2^L)."""

    calibration_scores: np.ndarray
    measure: Measure = "l2"

    @classmethod
    def calibrate(cls, probs: np.ndarray, label_sets: np.ndarray, measure: Measure = "l2") -> LabelPowersetICP:
        return cls(np.sort(nonconformity(probs, label_sets, measure)), measure)

    @property
    def size(self) -> int:
        return len(self.calibration_scores)

    def p_values(self, probs: np.ndarray, label_sets: np.ndarray) -> np.ndarray:
        """p(Y_i) of label set i for example i (rows [N, L] each) — e.g. of the true sets, for validity checks."""
        return icp_p_values(self.calibration_scores, nonconformity(probs, label_sets, self.measure))

    def threshold(self, epsilon: float) -> float:
        return score_threshold(self.calibration_scores, epsilon)

    def predict(self, probs: np.ndarray, epsilon: float, limit: int = 1_000_000) -> PredictionSet:
        """Γ^ε of one example (probabilities [L]) without enumerating {0,1}^L: elimination, then pruned search."""
        cost0, cost1 = label_costs(probs, self.measure)
        t = self.threshold(epsilon)
        best = (cost1 < cost0).astype(np.int8)  # Y⁰
        delta = np.abs(cost1 - cost0)
        budget = t - label_set_scores(cost0, cost1, best)
        if budget < -_TOLERANCE:  # even Y⁰ is too strange
            return self._result(cost0, cost1, np.zeros((0, len(best)), dtype=np.int8), 1, 0, 0.0)
        free = np.flatnonzero(delta <= budget + _TOLERANCE)  # elimination: all others stay at Y⁰
        free = free[np.argsort(delta[free], kind="stable")]
        max_flips = int(np.searchsorted(np.cumsum(delta[free]), budget + _TOLERANCE, side="right"))
        ball = float(sum(math.comb(len(best), j) for j in range(max_flips + 1)))
        flips = _subsets_within_budget(delta[free], budget + _TOLERANCE, limit)
        candidates = np.repeat(best[None, :], len(flips), axis=0)
        candidates[:, free] ^= flips
        keep = label_set_scores(cost0, cost1, candidates) <= t
        return self._result(cost0, cost1, candidates[keep], len(candidates), len(free), ball)

    def predict_brute_force(self, probs: np.ndarray, epsilon: float) -> PredictionSet:
        """Γ^ε by scoring all 2^L label sets (the original LP-ICP); only for small L."""
        cost0, cost1 = label_costs(probs, self.measure)
        candidates = all_label_sets(len(cost0))
        scores = label_set_scores(cost0, cost1, candidates)
        keep = icp_p_values(self.calibration_scores, scores) > epsilon
        return PredictionSet(
            candidates[keep],
            icp_p_values(self.calibration_scores, scores[keep]),
            len(candidates),
            len(cost0),
            float(len(candidates)),
        )

    def _result(
        self, cost0: np.ndarray, cost1: np.ndarray, members: np.ndarray, evaluations: int, free: int, ball: float
    ) -> PredictionSet:
        p = icp_p_values(self.calibration_scores, label_set_scores(cost0, cost1, members))
        return PredictionSet(members, p, evaluations, free, ball)


# -- binary relevance baseline ----------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryRelevanceSets:
    """Per example and label, which values survive at level ε/L: `allowed` [N, L, 2] (value 0, value 1)."""

    allowed: np.ndarray

    def sizes(self) -> np.ndarray:
        """Number of label sets in each product set, Π_l |Γ_l| (float: it can exceed 2^62)."""
        return np.prod(self.allowed.sum(axis=2).astype(np.float64), axis=1)

    def covers(self, label_sets: np.ndarray) -> np.ndarray:
        y = np.asarray(label_sets, dtype=np.int64)
        return np.take_along_axis(self.allowed, y[:, :, None], axis=2)[:, :, 0].all(axis=1)


def binary_relevance_p_values(cal_probs: np.ndarray, cal_labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """BR-ICP p-values [N, L, 2] (label value 0, 1), from crepes' `ConformalClassifier` per label on hinge
    scores 1 − P̂(y) = |y − ô_l| with non-smoothed p-values — the same score as LP-ICP's `l1` for L = 1."""
    from crepes import ConformalClassifier

    cal_probs, probs = np.asarray(cal_probs, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    p = np.zeros((len(probs), cal_probs.shape[1], 2))
    for label in range(cal_probs.shape[1]):
        cal_alpha = np.abs(np.asarray(cal_labels)[:, label] - cal_probs[:, label])
        test_alpha = np.stack([probs[:, label], 1.0 - probs[:, label]], axis=1)  # α for y = 0, y = 1
        p[:, label] = ConformalClassifier().fit(cal_alpha).predict_p(test_alpha, smoothing=False)
    return p


def binary_relevance_sets(p_values: np.ndarray, epsilon: float) -> BinaryRelevanceSets:
    """Each label's ICP at level ε/L (Bonferroni), so the product set covers the whole true set w.p. ≥ 1 − ε."""
    return BinaryRelevanceSets(p_values > epsilon / p_values.shape[1])
