"""Guidance rules: APG's invariants (Sadat et al. 2025, Alg. 1) and agreement with diffusers' guiders."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from models.diffusion.guidance import GuidanceSpec, GuidanceState, apg, cfg, project

torch.set_num_threads(1)


def preds(seed: int = 0, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def test_apg_with_eta_one_no_rescale_no_momentum_is_cfg():
    d_c, d_u = preds()
    for w in (1.0, 3.0, 8.0):
        out = apg(d_c, d_u, w, eta=1.0, norm_threshold=math.inf, state=GuidanceState(momentum=0.0))
        torch.testing.assert_close(out, cfg(d_c, d_u, w), atol=1e-5, rtol=1e-5)


def test_apg_with_eta_zero_update_is_orthogonal_to_conditional_prediction():
    d_c, d_u = preds(1)
    update = apg(d_c, d_u, 6.0, eta=0.0, norm_threshold=2.0, state=GuidanceState(momentum=-0.5)) - d_c
    inner = (update.double() * d_c.double()).flatten(1).sum(1)
    assert inner.abs().max() < 1e-4 * update.flatten(1).norm(dim=1).max() * d_c.flatten(1).norm(dim=1).max()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_apg_update_norm_is_at_most_the_rescale_radius(eta):
    d_c, d_u = preds(2)
    d_c = 5 * d_c  # large ‖ΔD‖ so the radius binds
    w, r = 5.0, 0.7
    update = (apg(d_c, d_u, w, eta=eta, norm_threshold=r) - d_c) / (w - 1)
    assert (update.flatten(1).norm(dim=1) <= r + 1e-5).all()
    if eta == 1.0:  # nothing dropped: the rescaled difference has norm exactly r
        torch.testing.assert_close(update.flatten(1).norm(dim=1), torch.full((len(d_c),), r), atol=1e-5, rtol=0)


def test_projection_parts_sum_to_the_difference_and_ignore_the_scale_of_the_direction():
    diff, d_c = preds(3)
    par, orth = project(diff, d_c)
    torch.testing.assert_close(par + orth, diff, atol=1e-6, rtol=0)
    par2, orth2 = project(diff, 3.7 * d_c)
    torch.testing.assert_close(par2, par, atol=1e-6, rtol=0)
    torch.testing.assert_close(orth2, orth, atol=1e-6, rtol=0)


def test_momentum_at_step_two_is_current_difference_plus_beta_times_previous():
    (c1, u1), (c2, u2) = preds(4), preds(5)
    state = GuidanceState(momentum=-0.5)
    apg(c1, u1, 4.0, state=state)
    apg(c2, u2, 4.0, state=state)
    torch.testing.assert_close(state.running, (c2 - u2) + (-0.5) * (c1 - u1))


def test_guidance_interval_switches_guidance_off_outside_it():
    d_c, d_u = preds(6)
    spec = GuidanceSpec("cfg", 5.0, interval=(0.5, 1.0))
    assert spec.apply(d_c, d_u, spec.new_state(), 0, 10) is d_c
    torch.testing.assert_close(spec.apply(d_c, d_u, spec.new_state(), 7, 10), cfg(d_c, d_u, 5.0))


def test_cfg_agrees_with_diffusers_classifier_free_guidance():
    d_c, d_u = preds(7)
    guider = ClassifierFreeGuidance(guidance_scale=6.0)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    torch.testing.assert_close(guider.forward(d_c, d_u).pred, cfg(d_c, d_u, 6.0))


def test_apg_agrees_with_diffusers_normalized_guidance_over_several_steps():
    """diffusers' `original formulation` with scale w−1 is the paper's D_c + (w−1)(Δ⊥ + ηΔ∥)."""
    w, eta, r, beta = 7.0, 0.0, 1.5, -0.5
    ours, buffer = GuidanceState(momentum=beta), MomentumBuffer(beta)
    for step in range(4):
        d_c, d_u = preds(10 + step)
        expected = normalized_guidance(d_c, d_u, w - 1, buffer, eta, r, use_original_formulation=True)
        torch.testing.assert_close(apg(d_c, d_u, w, eta, r, ours), expected, atol=1e-5, rtol=1e-5)


def test_apg_agrees_with_the_diffusers_guider_class_when_its_buffer_is_set():
    w, eta, r, beta = 5.0, 0.3, 2.0, -0.25
    guider = AdaptiveProjectedGuidance(
        guidance_scale=w - 1,
        adaptive_projected_guidance_momentum=beta,
        adaptive_projected_guidance_rescale=r,
        eta=eta,
        use_original_formulation=True,
    )
    guider.momentum_buffer = MomentumBuffer(beta)  # only prepare_inputs makes it; forward() alone needs it set
    ours = GuidanceState(momentum=beta)
    for step in range(3):
        d_c, d_u = preds(20 + step)
        guider.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(999 - step))
        torch.testing.assert_close(apg(d_c, d_u, w, eta, r, ours), guider.forward(d_c, d_u).pred, atol=1e-5, rtol=1e-5)


def test_diffusers_default_formulation_differs_from_the_paper_when_eta_is_not_one():
    """diffusers' default formulation is not the paper's: D_u + w(Δ⊥ + ηΔ∥) is not D_c + (w−1)(Δ⊥ + ηΔ∥) for η ≠ 1."""
    d_c, d_u = preds(30)
    default = normalized_guidance(d_c, d_u, 5.0, None, 0.0, 0.0, use_original_formulation=False)
    assert not torch.allclose(default, apg(d_c, d_u, 5.0, eta=0.0), atol=1e-3)
