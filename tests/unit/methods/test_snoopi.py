"""SNOOPI / SwiftBrush invariants: the VSD gradient, zero-initialised LoRA, PG-SB with [w, w] = SwiftBrush,
per-sample guidance, NASA α = 0 on the one-step student, the colour attribute reader."""

from __future__ import annotations

import math

import pytest
import torch

import models.diffusion.vsd as vsd
from models.context import InMemoryRunContext
from models.diffusion.attributes import colour_shares, dominant_colour
from models.diffusion.data import COLOURS, HUES
from models.diffusion.guidance import cfg
from models.diffusion.model import new_parts, training_scheduler
from models.diffusion.vsd import (
    OneStep,
    VSDConfig,
    guided_eps,
    lora_teacher,
    one_step_sample,
    sample_kappa,
    teacher_predictions,
    train_vsd,
    vsd_gradient,
    vsd_loss,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    parts = new_parts(widths=(8, 16)).eval()
    with torch.no_grad():  # a non-trivial prompt encoder, so prompts differ
        for prm in parts.prompt_encoder.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    return parts


def _inputs(parts, b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.randint(20, 980, (b,), generator=g)
    with torch.no_grad():
        cond = parts.encode(torch.tensor([[1, 0, 1], [4, 2, 0], [7, 5, 2]])[:b])
        uncond = parts.encode(torch.tensor([parts.prompt_encoder.null_tokens] * b))
    return x, t, cond, uncond


def test_vsd_loss_gradient_is_sigma_squared_times_teacher_minus_lora(teacher):
    x, t, cond, uncond = _inputs(teacher)
    eps_teacher, eps_lora = torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(2))
    sigma = (1 - training_scheduler().alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    g = vsd_gradient(eps_teacher, eps_lora, sigma)
    torch.testing.assert_close(g, sigma**2 * (eps_teacher - eps_lora))
    x0 = x.clone().requires_grad_(True)
    vsd_loss(x0, g).backward()
    torch.testing.assert_close(x0.grad, g / x0.numel())


def test_lora_teacher_starts_equal_to_the_frozen_teacher_so_the_first_gradient_is_zero(teacher):
    teachers = lora_teacher(teacher.unet, rank=4, alpha=8.0)
    lora_b = [p for n, p in teachers.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # peft's zero-initialised B
    assert all(("lora_" in n) == p.requires_grad for n, p in teachers.named_parameters())
    x, t, cond, uncond = _inputs(teacher)
    kappa = torch.tensor([0.5, 2.0, 4.0]).view(-1, 1, 1, 1)
    frozen, lora = teacher_predictions(teachers, x, t, cond, uncond, kappa)
    with torch.no_grad():
        reference = guided_eps(teacher.unet, x, t, cond, uncond, kappa)
    torch.testing.assert_close(frozen, reference)
    torch.testing.assert_close(lora, frozen)
    assert vsd_gradient(frozen, lora, torch.ones(1)).abs().max() == 0
    with torch.no_grad():  # once the adapter moves, ψ stays the frozen teacher and π departs from it
        lora_b[0].add_(0.1)
    frozen2, lora2 = teacher_predictions(teachers, x, t, cond, uncond, kappa)
    torch.testing.assert_close(frozen2, reference)
    assert (lora2 - frozen2).abs().max() > 1e-4


def test_per_sample_guidance_scale_is_cfg_per_sample(teacher):
    x, t, cond, uncond = _inputs(teacher)
    kappa = sample_kappa(3, (0.5, 4.0), torch.Generator().manual_seed(3))
    assert ((kappa >= 0.5) & (kappa <= 4.0)).all() and kappa.unique().numel() == 3
    with torch.no_grad():
        batched = guided_eps(teacher.unet, x, t, cond, uncond, kappa)
        for i in range(3):
            s = slice(i, i + 1)
            eps_c = teacher.unet(x[s], t[s], encoder_hidden_states=cond[s]).sample
            eps_u = teacher.unet(x[s], t[s], encoder_hidden_states=uncond[s]).sample
            torch.testing.assert_close(batched[s], cfg(eps_c, eps_u, kappa[i].item()), atol=1e-5, rtol=1e-5)
    assert torch.equal(sample_kappa(4, (2.5, 2.5), torch.Generator().manual_seed(0)), torch.full((4, 1, 1, 1), 2.5))


def test_pg_sb_with_range_w_w_is_fixed_scale_swiftbrush(teacher, monkeypatch):
    config = VSDConfig(kappa_range=(3.0, 3.0), steps=2, batch_size=2, lora_rank=2, lora_alpha=4.0, seed=5)
    pg_sb, trace_pg = train_vsd(InMemoryRunContext(), teacher, config)
    monkeypatch.setattr(vsd, "sample_kappa", lambda n, r, g: 3.0)  # SwiftBrush: one float guidance scale
    swiftbrush, trace_sb = train_vsd(InMemoryRunContext(), teacher, config)
    assert trace_pg.vsd_loss == trace_sb.vsd_loss and trace_pg.lora_loss == trace_sb.lora_loss
    for (name, a), (_, b) in zip(pg_sb.unet.state_dict().items(), swiftbrush.unet.state_dict().items()):
        assert torch.equal(a, b), name
    assert trace_pg.vsd_loss[0] == 0.0  # zero-initialised LoRA: no student gradient at the first step
    assert any(not torch.equal(a, b) for a, b in zip(pg_sb.unet.parameters(), teacher.unet.parameters()))


def test_one_step_generator_inverts_the_epsilon_parameterisation(teacher):
    one = OneStep.for_schedule(training_scheduler().alphas_cumprod, 0.05)
    assert math.isclose(one.alpha**2 + one.sigma**2, 1.0, rel_tol=1e-6)
    z, _, cond, _ = _inputs(teacher)
    with torch.no_grad():
        x0 = one.generate(teacher.unet, z, cond)
        eps = teacher.unet(z, torch.full((3,), one.timestep), encoder_hidden_states=cond).sample
    torch.testing.assert_close(one.alpha * x0 + one.sigma * eps, z, atol=1e-5, rtol=1e-5)


def test_nasa_with_alpha_zero_leaves_the_one_step_student_unchanged(teacher):
    student, _ = train_vsd(InMemoryRunContext(), teacher, VSDConfig(steps=1, batch_size=2, lora_rank=2))
    tokens = torch.tensor([[3, 6, 3], [8, 6, 3]])
    negative = torch.tensor([10, 0, 3])
    before = {k: type(v) for k, v in student.unet.attn_processors.items()}
    plain = one_step_sample(student, tokens, 0)
    torch.testing.assert_close(one_step_sample(student, tokens, 0, negative, alpha=0.0), plain, atol=1e-5, rtol=1e-5)
    assert (one_step_sample(student, tokens, 0, negative, alpha=0.5) - plain).abs().max() > 1e-4
    torch.testing.assert_close(one_step_sample(student, tokens, 0, negative, cfg_scale=1.0), plain)
    assert {k: type(v) for k, v in student.unet.attn_processors.items()} == before


def test_colour_reader_names_each_painted_hue_and_ignores_background():
    import colorsys

    images = torch.zeros(len(HUES), 3, 16, 16)
    for k, hue in enumerate(HUES):
        rgb = torch.tensor(colorsys.hsv_to_rgb(((hue + 8) % 360) / 360, 0.55, 1.0))
        images[k, :, 4:12, 6:10] = rgb[:, None, None]
    assert dominant_colour(images).tolist() == list(range(len(COLOURS)))
    torch.testing.assert_close(colour_shares(images), torch.eye(len(COLOURS)))
    assert dominant_colour(torch.zeros(1, 3, 16, 16)).item() == -1


def test_snoopi_job_registers_a_one_step_student_and_saves_nasa_grid():
    """The job's contract on the seconds-long smoke base and smoke evaluation kit (`smoke`: the full ones train
    for minutes on a fresh machine), with the teacher given as a registered model."""
    from models.diffusion.model import save_parts
    from models.diffusion.training import base_model
    from models.methods.diffusion.snoopi import SnoopiParams, run
    from models.registry import registered_spec

    ctx = InMemoryRunContext()
    ctx.register_model("teacher", save_parts(base_model(ctx, smoke=True), ctx.workdir / "teacher"), {})
    params = SnoopiParams(
        model="teacher", steps=1, batch_size=2, lora_rank=2, per_class=1, negative_prompt="red", smoke=True
    )
    assert registered_spec(run).invoke(ctx, params)
    assert {"one_step_samples.png", "one_step_nasa.png"} <= set(ctx.artifacts)
    assert any(name.startswith("snoopi-") for name in ctx.models)
    with pytest.raises(ValueError):
        SnoopiParams(kappa_min=3.0, kappa_max=1.0)
