"""AMCL (Wang et al., ECCV 2024; loss reconstructed): temperature bounds, reduction to NT-Xent, the run."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from pytorch_metric_learning.losses import NTXentLoss

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation.amcl import AMCLParams, PairTemperature, amcl_loss, omega, run
from models.registry import registered_spec

torch.set_num_threads(1)


@pytest.fixture
def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(10, 8, generator=g, dtype=torch.float64)
    return z1, z1 + 0.3 * torch.randn(10, 8, generator=g, dtype=torch.float64)


def test_one_head_constant_temperature_and_no_regulariser_is_pml_ntxent(views):
    z1, z2 = views
    tau = torch.full((20, 20), 0.1, dtype=torch.float64)
    reference = NTXentLoss(temperature=0.1)(torch.cat([z1, z2]), torch.arange(10).repeat(2))
    torch.testing.assert_close(amcl_loss([z1], [z2], [tau], beta=0.0), reference)


def test_pair_temperatures_stay_within_bounds_and_are_symmetric():
    module = PairTemperature(8, tau_min=1e-5, tau_max=2.0)
    for scale in (0.01, 1.0, 1e3):
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale)
        tau = module(torch.randn(30, 8))
        assert torch.all((tau >= 1e-5) & (tau <= 2.0))
        torch.testing.assert_close(tau, tau.T)


def test_regulariser_is_minimal_at_two_over_d():
    grid = torch.linspace(0.001, 1.0, 100_000, dtype=torch.float64)
    assert float(grid[omega(grid, 64).argmin()]) == pytest.approx(2 / 64, abs=1e-4)


def test_heads_add_up(views):
    z1, z2 = views
    t1, t2 = torch.full((20, 20), 0.2, dtype=torch.float64), torch.full((20, 20), 0.5, dtype=torch.float64)
    both = amcl_loss([z1, z2], [z2, z1], [t1, t2], beta=0.1)
    assert float(both) == pytest.approx(float(amcl_loss([z1], [z2], [t1], 0.1) + amcl_loss([z2], [z1], [t2], 0.1)))
    assert math.isfinite(float(both))


def test_run_logs_temperatures_registers_an_encoder_and_stops_when_cancelled():
    ds = load_builtin("digits")
    ctx = InMemoryRunContext(dataset=ds, seed=0)
    run(ctx, AMCLParams(epochs=2, width=8, proj_dim=8, batch_size=128, checkpoint_every=1, plot="pca"))
    assert 1e-5 <= ctx.latest("tau_min_seen") <= ctx.latest("tau_mean") <= ctx.latest("tau_max_seen") <= 2.0
    assert 0.3 < ctx.latest("linear_probe_acc") <= 1.0 and len(ctx.models) == 1
    assert ctx.artifacts["curves.png"][1].startswith(b"\x89PNG") and ctx.load_checkpoint().step == 2
    cancelled = InMemoryRunContext(dataset=ds, seed=0)
    cancelled.cancel()
    assert not registered_spec(run).invoke(cancelled, AMCLParams(epochs=2, width=8, proj_dim=8))
    assert not cancelled.artifacts and cancelled.latest("linear_probe_acc") is None


def test_params_are_bounded():
    with pytest.raises(ValidationError):
        AMCLParams(heads=0)
    with pytest.raises(ValidationError):
        AMCLParams(augmentations="crop,blur")
