"""Comp-sum losses (Mao, Mohri & Zhong, ICML 2023): the τ family's closed forms, the smooth adversarial
loss, PGD, and the run's contract (metrics, calibration artifacts, resumable adversarial training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models.adversarial import pgd_cross_entropy, robust_accuracy
from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.comp_sum import Attack, CompSum, CompSumParams, SmoothAdvCompSum, comp_sum_loss, run
from models.nn.backbones import mlp
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)
K = 6


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, K, generator=g, dtype=torch.float64) * 2, torch.randint(0, K, (40,), generator=g)


def phi_of_u(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's definition, computed the long way: Φ^τ(Σ_{y'≠y} exp(z_y' − z_y))."""
    gaps = (z - z.gather(1, y[:, None])).exp()
    u = gaps.sum(1) - 1.0  # the k = y term is exp(0) = 1
    if tau == 1.0:
        return torch.log1p(u)
    return ((1.0 + u) ** (1.0 - tau) - 1.0) / (1.0 - tau)


def test_tau_one_is_exactly_cross_entropy(batch):
    z, y = batch
    torch.testing.assert_close(CompSum(1.0)(z, y), F.cross_entropy(z, y), rtol=0, atol=0)
    torch.testing.assert_close(comp_sum_loss(z, y, 1.0).mean(), F.cross_entropy(z, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.999, 1.0, 1.3, 2.0, 3.0])
def test_comp_sum_equals_phi_tau_of_the_exponential_gap_sum(batch, tau):
    z, y = batch
    torch.testing.assert_close(comp_sum_loss(z, y, tau), phi_of_u(z, y, tau), rtol=1e-9, atol=1e-10)


def test_named_members_of_the_family(batch):
    z, y = batch
    p_y = F.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(comp_sum_loss(z, y, 2.0), 1 - p_y)  # MAE (half of ‖e_y − p‖₁)
    torch.testing.assert_close(comp_sum_loss(z, y, 0.0), (1 - p_y) / p_y)  # sum-exponential
    torch.testing.assert_close(comp_sum_loss(z, y, 1.7), (1 - p_y**0.7) / 0.7)  # GCE with q = τ − 1


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5])
def test_loss_depends_on_logits_only_through_p_y(batch, tau):
    z, y = batch
    shifted = z + torch.randn(len(z), 1, dtype=z.dtype) * 5  # per-example constant shift keeps p unchanged
    torch.testing.assert_close(comp_sum_loss(shifted, y, tau), comp_sum_loss(z, y, tau))


def test_loss_is_continuous_in_tau_at_cross_entropy(batch):
    z, y = batch
    ce = comp_sum_loss(z, y, 1.0)
    torch.testing.assert_close(comp_sum_loss(z, y, 1.0 + 1e-7), ce, rtol=1e-5, atol=1e-6)


def test_smooth_adversarial_loss_with_nu_zero_is_plain_comp_sum():
    torch.manual_seed(0)
    model, x, y = mlp(12, K, hidden=[16]), torch.rand(32, 12), torch.randint(0, K, (32,))
    for tau in (0.5, 1.0):
        torch.testing.assert_close(SmoothAdvCompSum(tau, nu=0.0)(model, x, y), CompSum(tau)(model(x), y))


def test_smooth_term_is_nonnegative_and_grows_with_the_radius():
    torch.manual_seed(0)
    model, x, y = mlp(12, K, hidden=[16]), torch.rand(64, 12), torch.randint(0, K, (64,))
    base = CompSum(1.0)(model(x), y)
    extra = [
        SmoothAdvCompSum(1.0, nu=1.0, attack=Attack(eps, eps / 4, 10))(model, x, y) - base for eps in (0.01, 0.1, 0.3)
    ]
    assert 0 <= extra[0] < extra[1] < extra[2]


def test_pgd_stays_in_the_ball_and_the_image_range_and_lowers_accuracy():
    torch.manual_seed(0)
    ds = load_builtin("digits")
    x = torch.as_tensor(ds.test["x"][:200], dtype=torch.float32)
    y = torch.as_tensor(ds.test["y"][:200])
    model = mlp(64, 10, hidden=[32])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x_adv = pgd_cross_entropy(model, x, y, eps=0.1, step_size=0.025, steps=10)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert robust_accuracy(model, x, y, eps=0.0, steps=5) == pytest.approx(clean)
    assert robust_accuracy(model, x, y, eps=0.1, steps=10) < clean - 0.1


def test_params_enforce_ranges():
    with pytest.raises(ValidationError):
        CompSumParams(tau=-0.5)
    with pytest.raises(ValidationError):
        CompSumParams(loss="hinge")


def fast(**overrides: object) -> CompSumParams:
    return CompSumParams(
        **{
            "hidden": 32,
            "epochs": 4,
            "batch_size": 128,
            "checkpoint_every": 2,
            "attack_steps": 2,
            "eval_steps": 3,
            **overrides,
        }
    )


def test_run_logs_calibration_and_robust_accuracy_and_saves_plots():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast(loss="trades"))
    names = {p.name for p in ctx.metrics}
    assert {
        "train_loss",
        "val_acc",
        "val_ece",
        "val_nll",
        "test_acc",
        "test_ece",
        "test_nll",
        "test_robust_acc",
    } <= names
    assert 0.0 <= ctx.latest("test_robust_acc") <= ctx.latest("test_acc") + 0.05
    for name in ("curves.png", "reliability.png"):
        kind, png = ctx.artifacts[name]
        assert kind == "plot" and png.startswith(b"\x89PNG")


def test_resumed_adversarial_run_ends_identical_to_an_uninterrupted_one():
    params = fast(loss="smooth-adv-comp-sum", tau=0.5, nu=0.3)
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), params, seed=3, stop_after=3)
    assert crashed.latest("test_acc") is None and crashed.load_checkpoint().step == 2
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("test_robust_acc") == whole.latest("test_robust_acc")
