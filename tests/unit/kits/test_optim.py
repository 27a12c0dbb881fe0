"""Invariants of the optimizers in `models/optim` (FRUGAL, Stable-SPAM), the fake-quantised linear layer,
the registry, and agreement with the libraries that implement the same optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.checkpoint import decode_checkpoint, encode_checkpoint
from models.nn.fake_quant import QLinear, fake_quantize, quantize_linears
from models.optim import FRUGAL, GALORE_SCALE, OPTIMIZERS, StableSPAM, build_optimizer, optimizer_state_bytes
from models.optim.frugal import choose_projector, split_gradient
from models.optim.stable_spam import ada_clip, cosine_decay

torch.set_num_threads(1)


class Stack(nn.Module):
    """A toy network with the parameter names of a transformer (`embed_tokens`, `layers.N.`, `lm_head`)."""

    def __init__(self, width: int = 12, depth: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, width)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, 10, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(self.norm(h))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10, (4, 6), generator=g) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], loss_scale: float = 1.0) -> None:
    for tokens in data:
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 10), tokens.roll(1, 1).reshape(-1)) * loss_scale
        opt.zero_grad()
        loss.backward()
        opt.step()


def twin_models(seed: int = 0) -> tuple[Stack, Stack]:
    torch.manual_seed(seed)
    a = Stack()
    b = Stack()
    b.load_state_dict(a.state_dict())
    return a, b


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=name)


# -- FRUGAL ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["block", "columns", "rows", "randk"])
def test_frugal_at_full_density_equals_adamw(projection):
    ours, ref = twin_models()
    data = batches(8)
    train(
        ours,
        build_optimizer("frugal", ours, lr=1e-2, weight_decay=0.1, density=1.0, projection=projection, update_gap=1000),
        data,
    )
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1), data)
    assert_same_weights(ours, ref)


@pytest.mark.parametrize("projection", ["svd", "block", "columns"])
def test_frugal_at_zero_density_is_sign_sgd_on_projectable_weights(projection):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = FRUGAL([w], lr=0.1, density=0.0, projection=projection)
    for _ in range(3):
        grad = torch.randn(6, 4)
        before = w.detach().clone()
        w.grad = grad
        opt.step()
        torch.testing.assert_close(w.detach(), before - 0.1 * grad.sign())


@pytest.mark.parametrize("projection", ["svd", "columns", "rows", "randk"])
def test_frugal_split_parts_are_orthogonal_and_sum_to_the_gradient(projection):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(9, 5, generator=g)
    state = choose_projector(grad, projection, 0.4, g)
    full, free = split_gradient(grad, state)
    torch.testing.assert_close(full + free, grad)
    assert abs(float((full * free).sum())) < 1e-5 * float(grad.square().sum())
    assert full.norm() > 0 and free.norm() > 0


def test_frugal_svd_keeps_the_top_singular_directions():
    grad = torch.randn(8, 6)
    full, _ = split_gradient(grad, choose_projector(grad, "svd", 0.5, torch.Generator()))
    u, s, vh = torch.linalg.svd(grad)
    torch.testing.assert_close(full, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", ["svd", "columns", "block"])
def test_frugal_state_bytes_grow_with_density(projection):
    sizes = []
    for density in (0.0, 0.25, 0.5, 1.0):
        model = Stack(width=16, depth=4)
        opt = build_optimizer("frugal", model, density=density, projection=projection)
        train(model, opt, batches(1))
        sizes.append(optimizer_state_bytes(opt))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    adamw_model = Stack(width=16, depth=4)
    adamw = torch.optim.AdamW(adamw_model.parameters())
    train(adamw_model, adamw, batches(1))
    assert optimizer_state_bytes(adamw) > sizes[1]


def checkpoint_round_trip(make_opt, steps_before: int = 5, steps_after: int = 7, prepare=lambda m: m) -> None:
    """Resuming from a safetensors checkpoint ends exactly where an uninterrupted run ends (`prepare` turns
    the fresh model into the trained architecture, e.g. SST's factorised layers)."""
    data = batches(steps_before + steps_after, seed=3)
    straight, resumed = (prepare(m) for m in twin_models(seed=1))
    opt = make_opt(straight)
    train(straight, opt, data)
    partial = prepare(twin_models(seed=1)[0])
    opt_partial = make_opt(partial)
    train(partial, opt_partial, data[:steps_before])
    blob = encode_checkpoint({"model": partial.state_dict(), "optimizer": opt_partial.state_dict()}, steps_before)
    state = decode_checkpoint(blob).state
    resumed.load_state_dict(state["model"])
    opt_resumed = make_opt(resumed)
    opt_resumed.load_state_dict(state["optimizer"])
    train(resumed, opt_resumed, data[steps_before:])
    assert_same_weights(straight, resumed, atol=0.0)


@pytest.mark.parametrize("projection", ["svd", "block", "randk"])
def test_frugal_state_dict_round_trips_through_the_checkpoint(projection):
    checkpoint_round_trip(
        lambda m: build_optimizer(
            "frugal", m, lr=1e-2, density=0.5, projection=projection, update_gap=3, block_order="random", seed=7
        )
    )


def test_frugal_svd_without_state_free_part_agrees_with_galore():
    """FRUGAL with the GaLore projector and no state-free update is GaLore-AdamW (scale 1)."""
    from galore_torch import GaLoreAdamW

    torch.manual_seed(0)
    w_ours = nn.Parameter(torch.randn(10, 6))
    w_ref = nn.Parameter(w_ours.detach().clone())
    ours = FRUGAL(
        [{"params": [w_ours], "is_proj_params": True}],
        lr=1e-2,
        density=0.5,
        projection="svd",
        state_free="none",
        update_gap=100,
        eps=1e-12,
    )
    ref = GaLoreAdamW(
        [{"params": [w_ref], "rank": 3, "update_proj_gap": 100, "scale": 1.0, "proj_type": "std"}], lr=1e-2, eps=1e-12
    )
    for _ in range(6):
        grad = torch.randn(10, 6)
        w_ours.grad, w_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(w_ours, w_ref, atol=1e-5, rtol=1e-5)


def test_galore_baseline_takes_the_papers_scale_by_default_and_scales_its_projected_step():
    """`galore-adamw` runs at α = 0.25 (the GaLore paper's pre-training scale) unless told otherwise, and α
    scales the step of the projected weights (the others get plain AdamW)."""
    deltas = {}
    for scale in (None, 1.0):
        model, before = twin_models(seed=5)
        kw = {} if scale is None else {"scale": scale}
        opt = build_optimizer("galore-adamw", model, lr=1e-2, density=0.5, **kw)
        projected = [g for g in opt.param_groups if "rank" in g]
        assert projected and all(g["scale"] == (GALORE_SCALE if scale is None else scale) for g in projected)
        train(model, opt, batches(1))
        deltas[scale] = {n: p - q for (n, p), q in zip(model.named_parameters(), before.parameters())}
    assert GALORE_SCALE == 0.25
    for name, delta in deltas[1.0].items():
        expected = GALORE_SCALE * delta if name.startswith("layers.") and delta.ndim == 2 else delta
        torch.testing.assert_close(deltas[None][name], expected, atol=1e-7, rtol=1e-4, msg=name)


def test_galore_takes_an_explicit_rank():
    opt = build_optimizer("galore-adamw", Stack(width=16), rank=3, scale=1.0)
    assert {(g["rank"], g["scale"]) for g in opt.param_groups if "rank" in g} == {(3, 1.0)}


# -- Stable-SPAM ----------------------------------------------------------------------------------------


def spiky_grads(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=g) for _ in range(n)]
    for i in range(3, n, 7):  # occasional entry spikes, the failure mode the clip is for
        grads[i].view(-1)[i % grads[i].numel()] *= 1e3
    return grads


def test_stable_spam_agrees_with_pytorch_optimizer():
    from pytorch_optimizer import StableSPAM as LibraryStableSPAM

    torch.manual_seed(0)
    w_ours = nn.Parameter(torch.randn(5, 7))
    w_ref = nn.Parameter(w_ours.detach().clone())
    kw = dict(lr=1e-2, gamma1=0.7, gamma2=0.9, theta=0.999, weight_decay=0.01)
    ours = StableSPAM([w_ours], reset_interval=10, **kw)
    ref = LibraryStableSPAM([w_ref], update_proj_gap=10, **kw)
    for grad in spiky_grads(25, (5, 7)):
        w_ours.grad, w_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(w_ours, w_ref, atol=1e-6, rtol=1e-5)


def test_stable_spam_cosine_decay_of_beta1_and_gamma1_agrees_with_pytorch_optimizer():
    """With `total_T` the library scales β₁ and γ₁ by a factor it steps through torch's `CosineAnnealingLR`
    (recursively, over T + 1 epochs): the closed form η_min + (1 − η_min)(1 + cos(πt/T))/2 drifts from it by
    ~1e-2 within a few steps. Past T and across a reset too."""
    from pytorch_optimizer import StableSPAM as LibraryStableSPAM

    torch.manual_seed(0)
    w_ours = nn.Parameter(torch.randn(5, 7))
    w_ref = nn.Parameter(w_ours.detach().clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.999), gamma1=0.85, gamma2=0.9, theta=0.999, eta_min=0.5)
    ours = StableSPAM([w_ours], reset_interval=12, total_T=16, **kw)
    ref = LibraryStableSPAM([w_ref], update_proj_gap=12, t_max=16, **kw)
    for grad in spiky_grads(24, (5, 7), seed=1):
        w_ours.grad, w_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(w_ours, w_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.state[w_ours]["norm_avg"], ref.state[w_ref]["m_norm_t"], atol=1e-6, rtol=1e-5)


def test_stable_spam_cosine_decay_factor_is_torchs_cosine_annealing_stepped_once_per_step():
    from torch.optim.lr_scheduler import CosineAnnealingLR

    total, eta_min = 10, 0.5
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = CosineAnnealingLR(probe, total + 1, eta_min)
    factor = 1.0
    for step in range(1, total + 4):
        factor = cosine_decay(factor, step, total, eta_min)
        if step < total:
            schedule.last_epoch = step
            probe.step()
            schedule.step()
            assert factor == probe.param_groups[0]["lr"]
        else:
            assert factor == eta_min


def test_stable_spam_with_cosine_decay_round_trips_through_the_checkpoint():
    checkpoint_round_trip(lambda m: build_optimizer("stable-spam", m, lr=1e-2, reset_interval=4, total_T=5))


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_stable_spam_updates_do_not_change_when_the_loss_is_scaled(c):
    ours, scaled = twin_models(seed=2)
    data = batches(12, seed=4)
    train(ours, StableSPAM(ours.parameters(), lr=1e-2, reset_interval=5), data)
    train(scaled, StableSPAM(scaled.parameters(), lr=1e-2, reset_interval=5), data, loss_scale=c)
    assert_same_weights(ours, scaled, atol=1e-5)


def test_adamw_updates_do_change_when_the_loss_is_scaled_by_a_small_factor():
    """The control for the test above: without AdaGN, ε makes Adam's step depend on the loss scale."""
    ours, scaled = twin_models(seed=2)
    data = batches(12, seed=4)
    train(ours, torch.optim.AdamW(ours.parameters(), lr=1e-2, eps=1e-3), data)
    train(scaled, torch.optim.AdamW(scaled.parameters(), lr=1e-2, eps=1e-3), data, loss_scale=1e-3)
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), scaled.parameters())) > 1e-3


def test_ada_clip_bounds_the_entries_by_the_running_max():
    max_avg = torch.zeros(())
    theta = 0.999
    for t, grad in enumerate(spiky_grads(20, (40,)), start=1):
        clipped = ada_clip(grad, max_avg, theta, t)
        bound = max_avg / (1 - theta**t)
        assert clipped.abs().max() <= bound * (1 + 1e-6)
        unclipped = grad.abs() <= bound
        torch.testing.assert_close(clipped[unclipped], grad[unclipped])


def test_stable_spam_resets_the_moments_every_interval():
    w = nn.Parameter(torch.randn(4, 4))
    opt = StableSPAM([w], lr=1e-2, betas=(0.9, 0.999), reset_interval=6)
    for t, grad in enumerate(spiky_grads(12, (4, 4)), start=1):
        w.grad = grad
        opt.step()
        state = opt.state[w]
        # right after a reset the moments hold one gradient only: m = (1−β₁)ĝ and v = (1−β₂)ĝ²
        single = torch.allclose(
            state["exp_avg"].square() / (1 - 0.9) ** 2, state["exp_avg_sq"] / (1 - 0.999), rtol=1e-4, atol=1e-12
        )
        assert single == (t in (1, 6, 12)), t


def test_stable_spam_state_dict_round_trips_through_the_checkpoint():
    checkpoint_round_trip(lambda m: build_optimizer("stable-spam", m, lr=1e-2, reset_interval=4))


# -- fake quantisation -----------------------------------------------------------------------------------


def test_fake_quantize_uses_at_most_15_levels_per_group_and_passes_gradients_straight_through():
    x = torch.randn(3, 128, requires_grad=True)
    q = fake_quantize(x, bits=4, group_size=64)
    for row in q.detach().reshape(-1, 64):
        assert row.unique().numel() <= 15
    q.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(fake_quantize(q.detach(), 4, 64), q.detach())  # idempotent


def test_quantize_linears_shares_parameters_and_skips_the_head():
    model = Stack(width=64)
    reference = model(batches(1)[0])
    quantize_linears(model, bits=16)
    assert isinstance(model.layers[0][0], QLinear) and type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(batches(1)[0]), reference)
    for module in model.modules():
        if isinstance(module, QLinear):
            module.bits = 4
    assert (model(batches(1)[0]) - reference).abs().max() > 0


# -- registry ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_named_optimizer_trains_a_model_and_reports_state_bytes(name):
    torch.manual_seed(0)
    model = Stack()
    opt = build_optimizer(name, model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(3))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer_state_bytes(opt) >= 0


def test_adamw_state_bytes_are_two_moments_per_parameter():
    model = Stack()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, batches(1))
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 4 * len(list(model.parameters()))  # + a float32 step each


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adamw2", Stack())


def test_a_digits_classifier_trains_with_frugal_through_the_shared_trainer():
    from models.context import InMemoryRunContext
    from models.datasets import load_builtin
    from models.nn.losses import CrossEntropy
    from models.training import ClassifierTrainingParams, classification_data, fit_classifier

    data = classification_data(load_builtin("digits"))
    params = ClassifierTrainingParams(epochs=2, lr=1e-2, optimizer="frugal", checkpoint_every=0)
    torch.manual_seed(0)
    model = params.backbone_for(data)
    history = fit_classifier(InMemoryRunContext(), model, CrossEntropy(), data, params.schedule())
    assert history[-1]["val_acc"] > 0.5
