"""The hyperbolic core: ball invariants, our layers against geoopt and hypll (the Poincaré ResNet authors'
library) in float64, and the identity properties Poincaré ResNet relies on."""

from __future__ import annotations

import math

import pytest
import torch
from hypll.manifolds.poincare_ball.math.linalg import poincare_fully_connected, poincare_hyperplane_dists
from hypll.manifolds.poincare_ball.math.stats import midpoint as hypll_midpoint

from models.hyperbolic import (
    MobiusLinear,
    PoincareBall,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareLinear,
    ganea_mlr,
    hyperplane_distances,
    poincare_fc,
    riemannian_adam,
)

C = 0.1
D64 = torch.float64


def points(n: int, d: int, ball: PoincareBall, seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ball.expmap0(torch.randn(n, d, generator=g, dtype=D64) * scale)


def test_distance_is_zero_on_the_diagonal_and_symmetric():
    ball = PoincareBall(C)
    x, y = points(16, 5, ball, 0), points(16, 5, ball, 1)
    assert torch.allclose(ball.dist(x, x), torch.zeros(16, dtype=D64), atol=1e-7)
    assert torch.allclose(ball.dist(x, y), ball.dist(y, x), atol=1e-12)


def test_distance_tends_to_twice_euclidean_as_curvature_vanishes():
    x, y = torch.randn(8, 3, dtype=D64) * 0.3, torch.randn(8, 3, dtype=D64) * 0.3
    for c, tol in ((1e-4, 1e-3), (1e-7, 1e-6)):
        assert torch.allclose(PoincareBall(c).dist(x, y), 2 * (x - y).norm(dim=-1), rtol=tol)


def test_log_inverts_exp_at_origin_and_at_a_point():
    ball = PoincareBall(C)
    v = torch.randn(10, 4, dtype=D64)
    assert torch.allclose(ball.logmap0(ball.expmap0(v)), v, atol=1e-10)
    x = points(10, 4, ball, 2)
    assert torch.allclose(ball.logmap(x, ball.expmap(x, v)), v, atol=1e-8)


def test_distance_matches_the_closed_form():
    ball = PoincareBall(C)
    x, y = points(12, 3, ball, 3), points(12, 3, ball, 4)
    expected = 2 / math.sqrt(C) * torch.atanh(math.sqrt(C) * ball.mobius_add(-x, y).norm(dim=-1))
    assert torch.allclose(ball.dist(x, y), expected, atol=1e-10)


def test_mlr_logit_vanishes_at_its_gyroplane_point():
    ball = PoincareBall(C)
    p, a = points(4, 6, ball, 5), torch.randn(4, 6, dtype=D64)
    logits = ganea_mlr(p, p, a, ball)
    assert torch.allclose(logits.diagonal(), torch.zeros(4, dtype=D64), atol=1e-12)


def test_hnnpp_distances_equal_ganea_mlr_and_hypll():
    ball = PoincareBall(C)
    x = points(9, 5, ball, 6)
    z, r = torch.randn(5, 3, dtype=D64), torch.randn(3, dtype=D64) * 0.5
    ours = hyperplane_distances(x, z, r, C)
    p = ball.expmap0(r[:, None] * (z / z.norm(dim=0)).T)  # HNN++ Eq. 6: p_k = exp₀(r_k ẑ_k)
    a = (1 / torch.cosh(math.sqrt(C) * r))[:, None] ** 2 * z.T  # a_k = sech²(√c r_k) z_k
    assert torch.allclose(ours, ganea_mlr(x, p, a, ball), atol=1e-10)
    c = torch.tensor(C, dtype=D64)
    assert torch.allclose(ours, poincare_hyperplane_dists(x, z, r, c), atol=1e-12)
    assert torch.allclose(poincare_fc(x, z, r, C), poincare_fully_connected(x, z, r, c), atol=1e-12)


def test_fc_with_half_identity_and_zero_offset_is_the_identity():
    ball = PoincareBall(C)
    x = points(20, 7, ball, 7, scale=3.0)
    z = 0.5 * torch.eye(7, dtype=D64)
    assert torch.allclose(poincare_fc(x, z, torch.zeros(7, dtype=D64), C), x, atol=1e-12)
    v = ball.logmap0(x)
    assert torch.allclose(PoincareLinear(7, 7, ball).double()(v), v, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_outputs_stay_inside_the_ball(scale: float):
    ball = PoincareBall(C)
    x = ball.project(points(32, 6, ball, 8, scale=scale).float())
    torch.manual_seed(0)
    layer = MobiusLinear(6, 5, ball)
    with torch.no_grad():
        layer.linear.weight.mul_(scale)
        layer.bias.fill_(scale)
    assert (layer(x).norm(dim=-1) < ball.radius).all()
    fc = poincare_fc(x, torch.randn(6, 5) * scale, torch.randn(5), C)
    assert (fc.norm(dim=-1) < ball.radius).all()
    clipped = ball.expmap0(ball.clip(torch.randn(32, 6) * 100 * scale, r=2.0))
    assert (clipped.norm(dim=-1) < ball.radius).all()
    assert torch.allclose(ball.logmap0(clipped).norm(dim=-1), torch.full((32,), 2.0), atol=1e-4)


def test_midpoint_of_antipodes_is_the_origin_and_of_copies_is_the_point():
    ball = PoincareBall(C)
    x = points(5, 4, ball, 9)
    pair = torch.stack([x, -x])  # [2, 5, 4]
    assert torch.allclose(ball.midpoint(pair), torch.zeros(5, 4, dtype=D64), atol=1e-12)
    copies = x[:1].expand(6, 4)
    assert torch.allclose(ball.midpoint(copies), x[0], atol=1e-12)


def test_midpoint_matches_geoopt_and_hypll():
    ball = PoincareBall(C)
    x = points(30, 4, ball, 10)
    ours = ball.midpoint(x)
    assert torch.allclose(ours, ball.geoopt.weighted_midpoint(x, reducedim=[0]), atol=1e-10)
    assert torch.allclose(ours, hypll_midpoint(x, torch.tensor(C, dtype=D64), batch_dim=0), atol=1e-12)


def test_frechet_mean_minimises_the_sum_of_squared_distances():
    ball = PoincareBall(C)
    x = points(25, 3, ball, 11, scale=2.5)
    m = ball.frechet_mean(x)
    grad = ball.logmap(m.unsqueeze(0), x).mean(0)  # minus the Riemannian gradient of the variance / 2
    assert grad.norm() < 1e-8
    karcher = ball.midpoint(x)
    for _ in range(200):  # damped Karcher flow, an independent solver
        karcher = ball.expmap(karcher, 0.3 * ball.logmap(karcher.unsqueeze(0), x).mean(0))
    assert torch.allclose(m, karcher, atol=1e-10)
    assert ball.frechet_variance(x, m) <= ball.frechet_variance(x, ball.midpoint(x)) + 1e-12


def test_identity_conv_and_batch_norm_keep_shapes_and_stay_finite():
    ball = PoincareBall(C)
    x = torch.randn(4, 3, 8, 8)
    conv = PoincareConv2d(3, 5, 3, ball, stride=2, padding=1)
    y = conv(x)
    assert y.shape == (4, 5, 4, 4)
    for mean in ("midpoint", "frechet"):
        out = PoincareBatchNorm2d(5, ball, mean)(y)
        assert out.shape == y.shape and torch.isfinite(out).all()
    # a 1×1 conv with identity init is the pointwise identity (β-scale 1, z = ½I)
    assert torch.allclose(PoincareConv2d(3, 3, 1, ball)(x), x, atol=1e-4)


def test_riemannian_adam_keeps_a_ball_parameter_on_the_ball():
    import geoopt

    ball = PoincareBall(C)
    p = geoopt.ManifoldParameter(points(1, 3, ball, 12).float(), manifold=ball.geoopt)
    opt = riemannian_adam([p], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (-p.norm()).backward()  # pushes towards the boundary
        opt.step()
    assert p.norm() < ball.radius


def test_ball_ops_match_geoopt_in_float64():
    ball = PoincareBall(C)
    ref = ball.geoopt
    x, y = points(40, 6, ball, 13, scale=2.0), points(40, 6, ball, 14, scale=2.0)
    v = torch.randn(40, 6, dtype=D64, generator=torch.Generator().manual_seed(15))
    pairs = {
        "mobius_add": (ball.mobius_add(x, y), ref.mobius_add(x, y)),
        "expmap0": (ball.expmap0(v), ref.expmap0(v)),
        "logmap0": (ball.logmap0(x), ref.logmap0(x)),
        "expmap": (ball.project(ball.expmap(x, v)), ref.expmap(x, v)),  # geoopt projects its result
        "logmap": (ball.logmap(x, y), ref.logmap(x, y)),
        "dist": (ball.dist(x, y), ref.dist(x, y)),
        "transp": (ball.transp(x, y, v), ref.transp(x, y, v)),
        "project": (ball.project(x * 10), ref.projx(x * 10)),
    }
    for name, (ours, theirs) in pairs.items():
        assert torch.allclose(ours, theirs, atol=1e-10), name


def test_gyration_is_the_gyrator_of_mobius_addition():
    ball = PoincareBall(C)
    u, v, w = (points(10, 4, ball, s) for s in (16, 17, 18))
    direct = ball.mobius_add(-ball.mobius_add(u, v), ball.mobius_add(u, ball.mobius_add(v, w)))
    assert torch.allclose(ball.gyration(u, v, w), direct, atol=1e-10)


def test_conv_and_midpoint_batch_norm_match_hypll_layers():
    from hypll.manifolds.poincare_ball import Curvature
    from hypll.manifolds.poincare_ball import PoincareBall as HypllBall
    from hypll.nn import HBatchNorm2d, HConvolution2d
    from hypll.tensors import ManifoldTensor

    before = torch.get_default_dtype()
    torch.set_default_dtype(D64)  # hypll's parameters cannot be cast after construction
    try:
        torch.manual_seed(0)
        ball, ref = PoincareBall(C), HypllBall(c=Curvature(C, constraining_strategy=lambda v: v))
        x = torch.randn(4, 3, 6, 6) * 0.5  # tangent vectors at 0, our layers' activations
        conv, ref_conv = (
            PoincareConv2d(3, 5, 3, ball, padding=1, init="gaussian"),
            HConvolution2d(3, 5, 3, ref, padding=1),
        )
        bn, ref_bn = PoincareBatchNorm2d(5, ball), HBatchNorm2d(5, ref, use_midpoint=True)
        with torch.no_grad():
            ref_conv.weights.tensor.copy_(conv.z)
            ref_conv.bias.copy_(torch.randn(5))
            conv.r.copy_(ref_conv.bias)
            ref_bn.norm.bias.copy_(torch.randn(5) * 0.1)
            bn.bias.copy_(ref_bn.norm.bias)
            ref_bn.norm.weight.fill_(0.7)
            bn.var.fill_(0.7)

        def through(layer, t: torch.Tensor) -> torch.Tensor:
            return ref.logmap(None, layer(ManifoldTensor(ball.expmap0(t, dim=1), manifold=ref, man_dim=1))).tensor

        with torch.no_grad():
            y = conv(x)
            assert torch.allclose(y, through(ref_conv, x), atol=1e-6)
            assert torch.allclose(bn(y), through(ref_bn, y), atol=1e-6)
    finally:
        torch.set_default_dtype(before)
