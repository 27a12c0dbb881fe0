"""Hyp-OC: pairwise confusion vanishes for identical halves, embeddings stay inside the clipped ball, the MLR's
logit is zero at its gyroplane point, and the spoofed-digits generator is seeded and well formed."""

from __future__ import annotations

import numpy as np
import torch

from models.datasets import load_builtin
from models.methods.structured.hyp_oc import HypOCParams, OneClassHead, attack_aucs, pairwise_confusion
from models.structured.spoof_digits import ATTACKS, CLASSES, build_spoof_digits


def test_pairwise_confusion_is_zero_for_identical_halves_in_both_geometries():
    torch.manual_seed(0)
    for geometry in ("hyperbolic", "euclidean"):
        head = OneClassHead(8, HypOCParams(geometry=geometry, hidden=8, embed_dim=4))
        half = head.embed(torch.randn(5, 8))
        assert pairwise_confusion(head, torch.cat([half, half])).item() < 1e-6
        assert pairwise_confusion(head, head.embed(torch.randn(10, 8))).item() > 0


def test_clipped_embeddings_lie_inside_the_radius_r_ball():
    torch.manual_seed(0)
    params = HypOCParams(hidden=8, embed_dim=4, clip_radius=2.0, curvature=0.1)
    head = OneClassHead(8, params)
    h = head.embed(1000 * torch.randn(64, 8))
    assert (head.ball.logmap0(h).norm(dim=-1) <= 2.0 + 1e-4).all()
    assert (h.norm(dim=-1) < head.ball.radius).all()


def test_mlr_puts_a_class_point_on_its_own_decision_boundary():
    torch.manual_seed(0)
    head = OneClassHead(8, HypOCParams(hidden=8, embed_dim=4))
    logits = head.logits(head.p.detach())
    assert torch.allclose(logits.diagonal(), torch.zeros(2), atol=1e-6)


def test_attack_aucs_rank_a_perfect_score_at_one_and_a_constant_at_a_half():
    y = np.repeat(np.arange(len(CLASSES)), 10)
    assert attack_aucs((y > 0).astype(float), y)["mean"] == 1.0
    assert attack_aucs(np.zeros(len(y)), y)["mean"] == 0.5


def test_spoof_digits_are_seeded_and_every_attack_changes_the_live_image():
    a, b = build_spoof_digits(0), build_spoof_digits(0)
    assert np.array_equal(a.splits["test"]["x"], b.splits["test"]["x"])
    test = load_builtin("spoof-digits").splits["test"]
    x, y, digit = np.asarray(test["x"]), np.asarray(test["y"]), np.asarray(test["digit"])
    assert x.shape[1:] == (1, 16, 16) and x.min() >= 0 and x.max() <= 1
    live = x[y == 0]
    for k, _ in enumerate(ATTACKS, start=1):
        assert np.array_equal(digit[y == k], digit[y == 0])  # the same digits, in the same order
        assert np.abs(x[y == k] - live).mean() > 0.01
