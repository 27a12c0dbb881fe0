"""pvd (Fang et al., AAAI 2023): the renderer's weights, the distillation losses' fixed point, the density clamp,
shared sample points, the hash grid's lookups, and the job's registered fields."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.context import InMemoryRunContext
from models.fields.grids import HashGrid
from models.fields.radiance import DENSITY_CLAMP, DENSITY_UNIT, clamp_density, hash_field, mlp_field
from models.fields.rendering import render_weights
from models.fields.scene import scene_views
from models.methods.generative.pvd import STAGES, Budget, PVDParams, distill, distillation_losses
from models.registry import get_method

torch.set_num_threads(1)


def test_rendering_weights_are_nonnegative_and_sum_to_the_opacity():
    g = torch.Generator().manual_seed(0)
    density = torch.rand(64, 20, generator=g) * torch.tensor([0.0, 0.1, 5.0, 500.0]).repeat(16)[:, None]
    deltas = torch.rand(64, 20, generator=g) * 0.2
    weights = render_weights(density, deltas)
    final_transmittance = torch.exp(-(density * deltas).sum(-1))
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), 1 - final_transmittance, rtol=0, atol=1e-5)
    assert bool((weights.sum(-1) <= 1 + 1e-6).all())


@pytest.mark.parametrize("mode", ["pvd", "rgb-only", "no-clamp"])
@pytest.mark.parametrize("fraction", [0.0, (STAGES[0] + STAGES[1]) / 2, 0.9])
def test_a_student_that_copies_its_teacher_has_every_loss_zero(mode, fraction):
    torch.manual_seed(0)
    teacher = mlp_field()
    student = copy.deepcopy(teacher)
    points = torch.rand(8, 12, 3) * 2 - 1
    losses = distillation_losses(teacher, student, points, torch.full((8, 12), 0.1), mode, fraction)
    for term in (losses.feature, losses.density, losses.colour, losses.rgb):
        assert float(term.detach()) == 0.0


def test_clamped_density_stays_in_range():
    features = torch.randn(1000, 16) * 50
    clamped = clamp_density(features)
    assert float(clamped[:, 0].min()) >= DENSITY_CLAMP[0] and float(clamped[:, 0].max()) <= DENSITY_CLAMP[1]
    assert torch.equal(clamped[:, 1:], features[:, 1:])
    torch.manual_seed(0)
    field = mlp_field()
    sigma, _ = field.density_and_colour(features, clamp=True)
    low, high = (math.exp(v) * DENSITY_UNIT for v in DENSITY_CLAMP)
    assert float(sigma.min()) >= low * (1 - 1e-6) and float(sigma.max()) <= high * (1 + 1e-6)


def test_teacher_and_student_see_the_same_sample_points():
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    torch.manual_seed(0)
    teacher, student = hash_field(torch.Generator().manual_seed(0)), mlp_field()
    for name, field in (("teacher", teacher), ("student", student)):
        field.geometry.register_forward_pre_hook(lambda _, args, n=name: seen[n].append(args[0].detach().clone()))
    distill(
        InMemoryRunContext(),
        teacher,
        student,
        scene_views(),
        Budget(steps=3, evaluations=1),
        seed=0,
        rays_per_step=32,
        samples=8,
    )
    training = 3  # the evaluation renders only the student
    assert len(seen["teacher"]) == training
    for a, b in zip(seen["teacher"], seen["student"][:training]):
        assert torch.equal(a, b)


def test_hash_grid_returns_the_table_entry_at_a_vertex():
    grid = HashGrid(torch.Generator().manual_seed(0), levels=3, table_size=2**8, min_resolution=4, max_resolution=16)
    with torch.no_grad():
        grid.tables.normal_()
    for level, resolution in enumerate(grid.resolutions):
        vertex = torch.tensor([[1, 2, 3]])
        row = grid.vertex_index(vertex, level)
        assert 0 <= int(row) < grid.table_size
        got = grid(vertex.float() / resolution)[:, 2 * level : 2 * level + 2]
        torch.testing.assert_close(got, grid.tables[level][row], rtol=0, atol=1e-6)


def test_job_registers_teacher_and_student_and_renders_a_registered_field():
    ctx = InMemoryRunContext(seed=0)
    params = PVDParams(teacher_seconds=1, seconds=1, steps=2, rays_per_step=16, samples=8, evaluations=1)
    assert get_method("pvd").invoke(ctx, params)
    assert {"pvd-teacher", "pvd-student"} <= set(ctx.models)
    assert {"test_views.png", "psnr_vs_seconds.png"} <= set(ctx.artifacts)
    assert get_method("pvd").invoke(ctx, PVDParams(render="pvd-student", azimuth=90, elevation=20))
    assert ctx.artifacts["render.png"][1].startswith(b"\x89PNG")
