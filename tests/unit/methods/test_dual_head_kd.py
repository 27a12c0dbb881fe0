"""Dual-head KD: BinaryKLNorm's closed form and properties, the heads' gradient separation, the run contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.dual_head_kd import (
    Distillation,
    DualHead,
    DualHeadKDParams,
    binary_kl_norm,
    run,
    softmax_kd,
)
from models.nn.backbones import mlp
from models.registry import registered_spec
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def reference_binary_kl_norm(student, teacher, T):
    """The released code's form: KLDivLoss against ½ on σ((s − t)/T), clamped, times T², summed / batch."""
    q = torch.sigmoid((student - teacher) / T).clamp(1e-8, 1 - 1e-8)
    half = torch.full_like(q, 0.5)
    kl = F.kl_div(q.log(), half, reduction="none") + F.kl_div((1 - q).log(), 1 - half, reduction="none")
    return T**2 * kl.sum() / len(student)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g, dtype=torch.float64) * 3, torch.randn(
        16, 5, generator=g, dtype=torch.float64
    ) * 3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_binary_kl_norm_matches_the_released_form_and_the_log_cosh_form(logits, T):
    s, t = logits
    torch.testing.assert_close(binary_kl_norm(s, t, T), reference_binary_kl_norm(s, t, T), rtol=1e-7, atol=1e-9)
    log_cosh = torch.log(torch.cosh((s - t) / (2 * T))).sum() * T**2 / len(s)
    torch.testing.assert_close(binary_kl_norm(s, t, T), log_cosh)


def test_binary_kl_norm_is_zero_only_at_the_teacher_and_sees_logit_offsets(logits):
    s, t = logits
    assert binary_kl_norm(t, t) == 0 and binary_kl_norm(s, t) > 0
    shifted = t + 3.0  # a constant per-row shift leaves softmax (and so classic KD) unchanged
    torch.testing.assert_close(softmax_kd(s, shifted), softmax_kd(s, t))
    assert binary_kl_norm(s, shifted) != pytest.approx(binary_kl_norm(s, t).item())
    assert binary_kl_norm(s, t) < 1e4  # finite for large gaps (no log of 0)
    assert torch.isfinite(binary_kl_norm(s * 1e4, t))


def grads(loss_fn, model, x, y):
    model.zero_grad()
    loss_fn(model, x, y, torch.arange(len(y))).backward()
    return {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in model.named_parameters()}


def test_dual_head_routes_ce_to_the_main_head_and_distillation_to_the_auxiliary_head():
    torch.manual_seed(0)
    model = DualHead(mlp(10, 4, hidden=[8]), 4)
    x, y, teacher = torch.rand(12, 10), torch.randint(0, 4, (12,)), torch.randn(12, 4) * 3
    only_kd = grads(Distillation(teacher, "binary-kl-norm", "aux", gamma=0.0, alpha=1.0, temperature=2.0), model, x, y)
    assert only_kd["head.weight"] == 0 and only_kd["aux_head.weight"] > 0 and only_kd["body.1.weight"] > 0
    only_ce = grads(Distillation(teacher, "binary-kl-norm", "aux", gamma=1.0, alpha=0.0, temperature=2.0), model, x, y)
    assert only_ce["aux_head.weight"] == 0 and only_ce["head.weight"] > 0
    single = grads(Distillation(teacher, "binary-kl-norm", "main", gamma=1.0, alpha=1.0, temperature=2.0), model, x, y)
    assert single["aux_head.weight"] == 0  # the single-head variant puts both losses on W₁


def fast(**overrides: object) -> DualHeadKDParams:
    return DualHeadKDParams(
        **{
            "hidden": 16,
            "teacher_hidden": 64,
            "epochs": 4,
            "teacher_epochs": 3,
            "batch_size": 32,
            "checkpoint_every": 2,
            **overrides,
        }
    )


def test_run_logs_student_and_teacher_metrics_and_saves_plots():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, fast())
    names = {p.name for p in ctx.metrics}
    assert {"val_ece", "test_acc", "test_ece", "test_nll", "teacher_test_acc"} <= names
    assert 0.3 < ctx.latest("test_acc") <= 1.0
    assert {"curves.png", "reliability.png"} <= set(ctx.artifacts)


def test_resumed_distillation_ends_identical_without_retraining_the_teacher():
    whole, crashed, resumed = interrupted_and_resumed(run, load_builtin("digits"), fast(), seed=4, stop_after=3)
    assert crashed.latest("test_acc") is None
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("test_acc") == whole.latest("test_acc")
    assert resumed.latest("teacher_test_acc") is None  # the teacher's logits came from the checkpoint


def test_cancel_while_the_teacher_trains_stops_before_any_student_epoch():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    reports = []

    def cancel_at_first_report(done: int, total: int, message: str) -> None:
        reports.append(message)
        ctx.cancel()

    ctx.on_progress = cancel_at_first_report
    assert not registered_spec(run).invoke(ctx, fast(teacher_epochs=500))
    assert reports == ["training the teacher"]
    assert not ctx.metrics and not ctx.artifacts and not ctx.checkpoints
