"""cam-fields (Lee et al., ICLR 2024): the modulation grids' invariants and the job's artifacts."""

from __future__ import annotations

import pytest
import torch

from models.context import InMemoryRunContext
from models.fields.modulation import ModulationGrid, sample_grid
from models.methods.generative.cam_fields import CAMParams, CoordinateMLP
from models.registry import get_method

torch.set_num_threads(1)


def coords(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))


def test_cam_at_its_initial_grid_is_exactly_the_normalised_mlp():
    torch.manual_seed(3)
    cam = CoordinateMLP("cam", torch.Generator().manual_seed(3), hidden=32, frequencies=16)
    torch.manual_seed(3)
    normalised = CoordinateMLP("ffn+norm", torch.Generator().manual_seed(3), hidden=32, frequencies=16)
    x = coords(200)
    assert torch.equal(cam(x), normalised(x))


def test_a_lookup_at_a_grid_node_returns_the_stored_value():
    grid = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    nodes = torch.stack([cols / 6, rows / 4], dim=-1).reshape(-1, 2)  # (x, y) of every node
    torch.testing.assert_close(sample_grid(grid, nodes), grid.reshape(2, -1).T, rtol=0, atol=1e-6)


def test_scale_and_shift_depend_only_on_the_coordinates():
    modulation = ModulationGrid((1.0, 0.0), resolution=8)
    with torch.no_grad():
        modulation.grid.normal_()
    torch.testing.assert_close(
        modulation(torch.tensor([[0.0, 0.0]]))[0], modulation.values()[:, 0, 0], rtol=0, atol=1e-6
    )
    x = coords(10)
    alone = modulation(x)
    among_others = modulation(torch.cat([coords(50, seed=1), x, coords(30, seed=2)]))[50:60]
    assert torch.equal(alone, among_others)
    cam = CoordinateMLP("cam", torch.Generator().manual_seed(0), hidden=16, frequencies=8, grid_resolution=8)
    h = torch.randn(10, 16, requires_grad=True)
    layer = cam.layers[1]
    scale_shift = layer.modulation(x)
    assert not scale_shift.requires_grad or torch.autograd.grad(scale_shift.sum(), h, allow_unused=True)[0] is None


@pytest.mark.parametrize("point", [(0.37, 0.81), (0.5, 0.5), (0.0, 1.0)])
def test_a_one_point_loss_reaches_at_most_four_cells_of_each_grid(point):
    cam = CoordinateMLP("cam", torch.Generator().manual_seed(0), hidden=16, frequencies=8, grid_resolution=8)
    cam(torch.tensor([point])).sum().backward()
    for modulation in cam.grids():
        touched = (modulation.grid.grad != 0).any(dim=0)  # cells whose s or b got gradient
        assert 0 < int(touched.sum()) <= 4


def test_job_fits_cam_and_the_ffn_and_saves_its_figures():
    ctx = InMemoryRunContext(seed=0)
    params = CAMParams(size=16, steps=6, hidden=16, frequencies=8, eval_every=3, grid_resolution=4)
    assert get_method("cam-fields").invoke(ctx, params)
    assert {"psnr_curves.png", "reconstructions.png", "modulation_grids.png"} <= set(ctx.artifacts)
    assert ctx.latest("test_psnr") == ctx.latest("cam_test_psnr") and ctx.latest("ffn_test_psnr") is not None
