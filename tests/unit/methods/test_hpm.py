"""HPM (hard-patch mining for masked image modelling): mask, loss and predictor-objective invariants,
parity with transformers' ViT-MAE, and the run's contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation.hpm import (
    HPMParams,
    MaskedAutoencoderViT,
    StudentTeacher,
    hard_fraction_at,
    hard_patch_mask,
    masked_count,
    patchify,
    reconstruction_loss,
    relative_prediction_loss,
    run,
    unpatchify,
)
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("length", "ratio", "alpha"), [(64, 0.75, 0.0), (64, 0.75, 0.5), (16, 0.6, 1.0), (49, 0.9, 0.3)]
)
def test_every_image_masks_exactly_the_ratio_and_the_hardest_predicted_patches(length, ratio, alpha):
    predicted = torch.randn(32, length, generator=torch.Generator().manual_seed(1))
    mask = hard_patch_mask(predicted, ratio, alpha, torch.Generator().manual_seed(2))
    n_masked = length - int(length * (1 - ratio))
    assert mask.sum(1).tolist() == [n_masked] * 32 == [masked_count(length, ratio)] * 32
    hardest = predicted.topk(int(n_masked * alpha), dim=1).indices
    assert mask.gather(1, hardest).all()


def test_at_hard_fraction_zero_the_mask_is_uniform_random_masking_draw_for_draw():
    predicted = torch.randn(8, 64)  # ignored at α = 0
    mask = hard_patch_mask(predicted, 0.75, 0.0, torch.Generator().manual_seed(3))
    noise = torch.rand(8, 64, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(8, 64, dtype=torch.bool).scatter(1, noise.topk(48, dim=1).indices, True)
    assert torch.equal(mask, expected)
    # and every position is masked equally often whatever the predicted losses say
    g = torch.Generator().manual_seed(4)
    frequency = (
        torch.stack([hard_patch_mask(torch.arange(64.0)[None].expand(50, -1), 0.75, 0.0, g) for _ in range(40)])
        .float()
        .mean((0, 1))
    )
    assert frequency.sub(0.75).abs().max() < 0.06  # 2,000 draws per position: s.d. ≈ 0.01


def test_random_masking_equals_transformers_vit_mae_masking_and_loss():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        mask_ratio=0.75,
    )
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(config).eval()
    x = torch.rand(6, 1, 16, 16)
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
    ours = hard_patch_mask(torch.zeros(6, 16), 0.75, 0.0, torch.Generator().manual_seed(9))
    assert torch.equal(ours, out.mask.bool())
    assert torch.equal(patchify(x, 4), hf.patchify(x))
    loss, _ = reconstruction_loss(out.logits, patchify(x, 4), ours)
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-6)


def test_patchify_round_trips():
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 1), x)


def test_reconstruction_loss_reads_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 5, generator=g, requires_grad=True), torch.randn(4, 16, 5, generator=g)
    mask = hard_patch_mask(torch.zeros(4, 16), 0.75, 0.0, g)
    loss, per_patch = reconstruction_loss(pred, target, mask)
    assert float(loss) == pytest.approx(float(per_patch[mask].mean()), rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask].abs().sum(-1) > 0)


def test_relative_objective_on_a_hand_made_pair():
    mask = torch.tensor([[True, True]])
    target = torch.tensor([[1.0, 2.0]])  # patch 1 is harder
    right = relative_prediction_loss(torch.tensor([[0.0, 3.0]]), target, mask)
    wrong = relative_prediction_loss(torch.tensor([[3.0, 0.0]]), target, mask)
    even = relative_prediction_loss(torch.tensor([[1.0, 1.0]]), target, mask)
    # both ordered pairs count: (0, 1) with label 1 on ℓ̂₁ − ℓ̂₀ and (1, 0) with label 0 on ℓ̂₀ − ℓ̂₁
    assert float(right) == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)
    assert float(wrong) == pytest.approx(math.log1p(math.exp(3.0)), rel=1e-6)
    assert float(even) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(relative_prediction_loss(torch.tensor([[0.0, 3.0]]), torch.tensor([[2.0, 2.0]]), mask)) == 0.0  # tie


def test_relative_objective_depends_on_the_ranking_of_masked_targets_only():
    g = torch.Generator().manual_seed(5)
    predicted, target = torch.randn(3, 10, generator=g), torch.rand(3, 10, generator=g)
    mask = hard_patch_mask(torch.zeros(3, 10), 0.7, 0.0, g)
    base = relative_prediction_loss(predicted, target, mask)
    assert float(relative_prediction_loss(predicted, torch.exp(5 * target) - 7, mask)) == pytest.approx(float(base))
    visible_changed = torch.where(mask, target, torch.rand(3, 10, generator=g) * 100)
    predicted_changed = torch.where(mask, predicted, torch.randn(3, 10, generator=g))
    assert float(relative_prediction_loss(predicted_changed, visible_changed, mask)) == pytest.approx(float(base))
    # the slow reference: every ordered masked pair of distinct targets, BCE on σ(ℓ̂_j − ℓ̂_i)
    terms = [
        -math.log(torch.sigmoid(predicted[b, j] - predicted[b, i]).item())
        if target[b, j] > target[b, i]
        else -math.log(1 - torch.sigmoid(predicted[b, j] - predicted[b, i]).item())
        for b in range(3)
        for i in range(10)
        for j in range(10)
        if mask[b, i] and mask[b, j] and target[b, i] != target[b, j]
    ]
    assert float(base) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_targets_are_detached_so_only_the_predictor_learns_from_the_ranking():
    predicted, target = torch.randn(2, 6, requires_grad=True), torch.rand(2, 6, requires_grad=True)
    relative_prediction_loss(predicted, target, torch.ones(2, 6, dtype=torch.bool)).backward()
    assert target.grad is None and predicted.grad.abs().sum() > 0


def test_masked_pixels_never_reach_the_model():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(
        image_size=16, patch_size=4, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1
    ).eval()
    x = torch.rand(2, 1, 16, 16)
    mask = hard_patch_mask(torch.zeros(2, 16), 0.75, 0.0, torch.Generator().manual_seed(0))
    changed = unpatchify(torch.where(mask[..., None], torch.rand(2, 16, 16), patchify(x, 4)), 4, 1)
    for a, b in zip(model(x, mask), model(changed, mask)):
        torch.testing.assert_close(a, b)


def test_teacher_is_an_ema_of_the_student_and_gets_no_gradient():
    pair = StudentTeacher(
        MaskedAutoencoderViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2, decoder_dim=8, decoder_depth=1)
    )
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in pair.teacher.parameters()]
    pair.update_teacher(0.75)
    for t, t0, s in zip(pair.teacher.parameters(), before, pair.student.parameters()):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * s)


def test_easy_to_hard_schedule_grows_linearly_to_alpha_max():
    assert [hard_fraction_at(t, 4, 0.5) for t in range(4)] == [0.125, 0.25, 0.375, 0.5]


def fast(**overrides: object) -> HPMParams:
    return HPMParams(
        **{
            "epochs": 4,
            "image_size": 8,
            "patch_size": 2,
            "dim": 16,
            "depth": 1,
            "heads": 2,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "batch_size": 512,
            "checkpoint_every": 2,
            "plot": "pca",
            **overrides,
        }
    )


def test_run_pretrains_logs_the_shared_evaluation_and_saves_mask_images():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast())
    assert [s for s, _ in ctx.history("reconstruction_loss")][:4] == [1, 2, 3, 4]
    assert ctx.latest("hard_fraction") == 0.5 and ctx.latest("prediction_loss") is not None
    assert 0.3 < ctx.latest("linear_probe_acc") <= 1.0 and ctx.latest("rankme") >= 1.0
    assert ctx.artifacts["masks.png"][1].startswith(b"\x89PNG") and ctx.artifacts["curves.png"][1].startswith(
        b"\x89PNG"
    )
    assert ctx.load_checkpoint().step == 4


def test_resumed_run_ends_identical_and_a_cancelled_run_publishes_nothing():
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), fast(), seed=3, stop_after=2)
    assert crashed.load_checkpoint().step == 2 and "report.json" not in crashed.artifacts
    assert [s for s, _ in crashed.history("reconstruction_loss")] == [1, 2]  # stopped within the next epoch
    assert resumed.history("reconstruction_loss") == whole.history("reconstruction_loss")[2:]
    assert resumed.latest("linear_probe_acc") == whole.latest("linear_probe_acc")


def test_params_are_checked():
    with pytest.raises(ValidationError):
        HPMParams(mask_ratio=1.0)
    with pytest.raises(ValueError, match="loss predictor"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), fast(loss_predictor=False))
    with pytest.raises(ValueError, match="multiple"):
        run(InMemoryRunContext(dataset=load_builtin("digits")), fast(patch_size=3))
