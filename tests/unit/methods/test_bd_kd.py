"""BD-KD: the divergences' invariants (zero at agreement, DML as a special case) and the run contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.classification.bd_kd import BalancedDivergence, BDKDParams, OnlinePair, divergence_weights, kl, run
from models.nn.backbones import mlp
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def dml_loss(zs, zt, y):
    """Deep mutual learning written out: each network's CE + KL(partner ‖ itself), partner detached."""
    ps, pt = F.softmax(zs, 1), F.softmax(zt, 1)
    student = F.cross_entropy(zs, y) + F.kl_div(F.log_softmax(zs, 1), pt.detach(), reduction="batchmean")
    teacher = F.cross_entropy(zt, y) + F.kl_div(F.log_softmax(zt, 1), ps.detach(), reduction="batchmean")
    return student + teacher


def test_fixed_weights_without_reverse_kl_and_a_forward_teacher_term_is_exactly_dml():
    torch.manual_seed(0)
    pair = OnlinePair(mlp(10, 4, hidden=[16]), mlp(10, 4, hidden=[8]))
    x, y = torch.rand(32, 10), torch.randint(0, 4, (32,))
    ours = BalancedDivergence("fixed", omega=0.0, teacher_term="forward")(pair, x, y)
    torch.testing.assert_close(ours, dml_loss(pair.student(x), pair.teacher(x), y))


def test_divergences_and_their_gradients_vanish_when_student_and_teacher_agree():
    torch.manual_seed(1)
    z = torch.randn(8, 5, requires_grad=True)
    log_p = F.log_softmax(z, 1)
    assert torch.allclose(kl(log_p, log_p.detach()), torch.zeros(8), atol=1e-7)
    kl(log_p.detach(), log_p).sum().backward()
    assert z.grad.abs().max() < 1e-6


def test_entropy_rule_sends_uncertain_students_to_reverse_kl_and_confident_ones_to_forward_kl():
    confident = F.log_softmax(torch.tensor([[6.0, 0.0, 0.0]]), 1)
    uncertain = F.log_softmax(torch.tensor([[0.5, 0.0, 0.0]]), 1)
    w_f, w_r = divergence_weights(uncertain, confident, "entropy", omega=2.0)  # student less sure than teacher
    assert w_f.item() == 0 and w_r.item() == 2.0
    w_f, w_r = divergence_weights(confident, uncertain, "entropy", omega=2.0)
    assert w_f.item() == 1 and w_r.item() == 0


def test_partners_are_detached_so_each_network_gets_only_its_own_loss_gradient():
    torch.manual_seed(2)
    pair = OnlinePair(mlp(10, 4, hidden=[16]), mlp(10, 4, hidden=[8]))
    x, y = torch.rand(16, 10), torch.randint(0, 4, (16,))
    BalancedDivergence()(pair, x, y).backward()
    student_grad = [p.grad.clone() for p in pair.student.parameters()]
    pair.zero_grad()
    zs, zt = pair.student(x), pair.teacher(x)
    log_ps, log_pt = F.log_softmax(zs, 1), F.log_softmax(zt, 1)
    w_f, w_r = divergence_weights(log_ps.detach(), log_pt.detach(), "entropy", 1.0)
    (F.cross_entropy(zs, y) + (w_f * kl(log_pt.detach(), log_ps) + w_r * kl(log_ps, log_pt.detach())).mean()).backward()
    for a, p in zip(student_grad, pair.student.parameters()):
        torch.testing.assert_close(a, p.grad)


def fast(**overrides: object) -> BDKDParams:
    return BDKDParams(
        **{"hidden": 16, "teacher_hidden": 64, "epochs": 4, "batch_size": 32, "checkpoint_every": 2, **overrides}
    )


def test_run_logs_student_and_teacher_metrics_and_resumes_identically():
    ds = load_builtin("digits")
    ctx = InMemoryRunContext(dataset=ds, seed=0)
    run(ctx, fast())
    assert {"test_acc", "test_ece", "teacher_test_acc", "val_ece"} <= {p.name for p in ctx.metrics}
    assert 0.3 < ctx.latest("test_acc") <= 1.0 and {"curves.png", "reliability.png"} <= set(ctx.artifacts)
    whole, crashed, resumed = interrupted_and_resumed(run, ds, fast(variant="dml"), seed=1, stop_after=3)
    assert crashed.latest("test_acc") is None
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("test_ece") == whole.latest("test_ece")
