"""Invariants of sparse spectral training (`models/optim/sst.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.optim.sst import SSTAdam, SSTLinear, resvd, sampling_probabilities, to_dense, to_sst
from tests.unit.kits.test_optim import Stack, batches, checkpoint_round_trip, train

torch.set_num_threads(1)


def test_sst_model_equals_the_dense_model_at_initialisation():
    torch.manual_seed(0)
    dense = Stack()
    sst = to_sst(copy.deepcopy(dense))
    assert sum(isinstance(m, SSTLinear) for m in sst.modules()) == 4 and type(sst.lm_head) is nn.Linear
    tokens = batches(1)[0]
    torch.testing.assert_close(sst(tokens), dense(tokens), atol=1e-5, rtol=1e-5)


def test_gradients_are_the_enhanced_spectral_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5)
    layer = SSTLinear.from_linear(linear)
    x = torch.randn(3, 4, 7)
    weight = layer.dense_weight().detach().requires_grad_(True)
    target = torch.randn(3, 4, 5)
    ((x @ weight.T + linear.bias - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    g = weight.grad
    u, v = layer.u.detach(), layer.v.detach()
    torch.testing.assert_close(layer.u.grad, g @ v)  # σ_i dropped (Eq. 5)
    torch.testing.assert_close(layer.v.grad, g.T @ u)
    torch.testing.assert_close(layer.s.grad, torch.diagonal(u.T @ g @ v))  # the true ∂L/∂Σ (Eq. 4)


def test_resvd_preserves_the_product_and_restores_orthonormal_factors():
    torch.manual_seed(0)
    u, s, v = torch.randn(6, 5), torch.rand(5), torch.randn(5, 5)  # k = min(6, 5)
    product = (u * s) @ v.T
    resvd(u, s, v)
    torch.testing.assert_close((u * s) @ v.T, product, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(5), atol=1e-5, rtol=0)
    assert (s >= 0).all()


def test_sampling_probabilities_sum_to_one_and_favour_large_singular_values():
    p = sampling_probabilities(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert p[0] > p[1] > p[2] and p.min() >= 0.5 / 4


def test_a_step_changes_only_the_sampled_columns_and_keeps_singular_values_non_negative():
    torch.manual_seed(0)
    model = to_sst(Stack())
    opt = SSTAdam.for_model(model, lr=0.5, rank=3, iteration_steps=100)
    layer = model.layers[0][0]
    before_u, before_v = layer.u.detach().clone(), layer.v.detach().clone()
    train(model, opt, batches(1))
    active = opt.state[layer.u]["indices"]
    inactive = torch.ones(layer.s.numel(), dtype=torch.bool)
    inactive[active] = False
    assert torch.equal(layer.u[:, inactive], before_u[:, inactive])
    assert torch.equal(layer.v[:, inactive], before_v[:, inactive])
    assert not torch.equal(layer.u[:, active], before_u[:, active])
    torch.testing.assert_close(layer.u[:, active].norm(dim=0), torch.ones(3))
    train(model, opt, batches(5, seed=1))
    assert all((m.s >= 0).all() for m in model.modules() if isinstance(m, SSTLinear))


def test_state_bytes_hold_only_the_active_columns():
    from models.optim import optimizer_state_bytes

    model = to_sst(Stack(width=16))
    opt = SSTAdam.for_model(model, rank=2)
    train(model, opt, batches(1))
    spectral = sum(m.u.numel() + m.v.numel() for m in model.modules() if isinstance(m, SSTLinear))
    dense_state = 2 * 4 * sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) < dense_state - 2 * 4 * spectral * 0.5


@pytest.mark.parametrize("iteration_steps", [2, 3])
def test_sst_state_dict_round_trips_through_the_checkpoint(iteration_steps):
    """Across iteration boundaries and a re-SVD (k = 12, rank 6: a round is 2 iterations)."""
    checkpoint_round_trip(
        lambda m: SSTAdam.for_model(m, lr=1e-2, rank=6, iteration_steps=iteration_steps), prepare=to_sst
    )


def test_to_dense_folds_back_to_the_same_function():
    torch.manual_seed(0)
    model = to_sst(Stack())
    train(model, SSTAdam.for_model(model, lr=1e-2, rank=4, iteration_steps=2), batches(5))
    tokens = batches(1, seed=9)[0]
    expected = model(tokens)
    dense = to_dense(model)
    assert not any(isinstance(m, SSTLinear) for m in dense.modules())
    torch.testing.assert_close(dense(tokens), expected, atol=1e-5, rtol=1e-5)
