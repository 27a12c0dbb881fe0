"""Poincaré ResNet: identity init keeps norms through depth, Gaussian init collapses them, the network stays on
the ball, and a resumed Riemannian Adam takes the same steps."""

from __future__ import annotations

import copy

import torch

from models.datasets import load_builtin
from models.hyperbolic import PoincareBall, riemannian_adam
from models.hyperbolic.disc import to_disc
from models.methods.structured.poincare_resnet import PoincareResNetParams, ResNet, norms_through_depth


def digits(n: int = 64) -> torch.Tensor:
    return torch.as_tensor(load_builtin("digits").splits["train"]["x"][:n])


def test_identity_init_keeps_norms_through_20_fc_layers_and_gaussian_collapses_them():
    ball = PoincareBall(0.1)
    torch.manual_seed(0)
    identity = norms_through_depth(digits(), ball, "identity")
    gaussian = norms_through_depth(digits(), ball, "gaussian")
    assert len(identity) == 20
    assert abs(identity[-1] / identity[0] - 1) < 1e-5
    assert gaussian[-1] / gaussian[0] < 0.1


def test_poincare_resnet_features_lie_inside_the_ball_and_logits_are_finite():
    torch.manual_seed(0)
    model = ResNet(PoincareResNetParams(channels=(2, 4, 4)), 1, 10)
    x = digits(16)
    logits = model(x)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    points = model.ball.expmap0(model.features(x))
    assert (points.norm(dim=-1) < model.ball.radius).all()
    disc = to_disc(points, model.ball)
    assert disc.shape == (16, 2) and (torch.as_tensor(disc).norm(dim=-1) < model.ball.radius).all()


def test_frechet_and_midpoint_batch_norm_networks_share_parameters():
    a = ResNet(PoincareResNetParams(channels=(2, 2, 2)), 1, 10)
    b = ResNet(PoincareResNetParams(channels=(2, 2, 2), batch_norm="frechet"), 1, 10)
    assert a.state_dict().keys() == b.state_dict().keys()


def test_riemannian_adam_resumed_from_its_state_dict_takes_identical_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = riemannian_adam([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        w.sin().sum().backward()
        opt.step()
    saved_w, saved_state = w.detach().clone(), copy.deepcopy(opt.state_dict())
    resumed_w = torch.nn.Parameter(saved_w.clone())
    resumed = riemannian_adam([resumed_w], lr=0.1)
    resumed.load_state_dict(saved_state)
    for param, optimizer in ((w, opt), (resumed_w, resumed)):
        optimizer.zero_grad()
        param.sin().sum().backward()
        optimizer.step()
    assert torch.equal(w, resumed_w)
