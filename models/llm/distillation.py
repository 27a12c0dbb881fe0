"""Distillation losses and the sparse fine-tuning loop shared by the LLM compression methods.

- CE: next-token cross-entropy on the data.
- KL: KL(p_teacher ‖ p_student) of the next-token distributions, averaged over tokens.
- SquareHead (Kurtic et al., "Sparse Finetuning for Inference Acceleration of Large Language
  Models", 2023, Eq. 1): Σ_l mean((h_s^l − h_t^l)²) / mean((h_t^l)²) over the hidden states HF returns
  after the embeddings (`hidden_states[1:]`, as the reference takes them): for a Llama of L blocks in
  transformers 5, the outputs of blocks 1 … L−1 and, last, the final-RMSNorm'd output of block L (HF
  returns that in place of block L's raw output). Each layer's MSE is normalised by the teacher's
  feature energy so layers of very different scale weigh alike. It is zero iff all these hidden states
  match and is invariant to scaling student and teacher jointly.

`finetune` trains a student against a frozen teacher with any weighted mix of the three, keeping
pruned weights at zero by re-applying the masks after every optimizer step (masks fixed, as SquareHead
fine-tunes), and checkpoints through the run context so a re-queued job resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.context import RunContext, stop_if_cancelled
from models.llm.compression.oneshot import apply_masks
from models.llm.data import random_windows


@dataclass(frozen=True)
class LossWeights:
    """h_CE, h_KL, h_SQ of the combined objective (SquareHead's defaults: 1, 0, 1)."""

    ce: float = 1.0
    kl: float = 0.0
    sq: float = 1.0


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_t ‖ p_s)."""
    s = F.log_softmax(student_logits.float(), dim=-1).reshape(-1, student_logits.shape[-1])
    t = F.log_softmax(teacher_logits.float(), dim=-1).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def squarehead_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], eps: float = 1e-12
) -> torch.Tensor:
    """Σ_l mean((h_s − h_t)²)/mean(h_t²) over paired layer outputs."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError("student and teacher must give the same number of hidden states")
    terms = [
        ((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(eps)
        for s, t in zip(student_hidden, teacher_hidden)
    ]
    return torch.stack(terms).sum()


def distillation_loss(
    student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted objective on one batch, and its parts (for logging)."""
    need_teacher = weights.kl > 0 or weights.sq > 0
    if need_teacher and teacher is None:
        raise ValueError("KL and SquareHead terms need a teacher")
    out = student(input_ids=ids, labels=ids if weights.ce > 0 else None, output_hidden_states=weights.sq > 0)
    total = torch.zeros((), device=ids.device)
    parts: dict[str, float] = {}
    if weights.ce > 0:
        total = total + weights.ce * out.loss
        parts["ce"] = out.loss.item()
    if need_teacher:
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=weights.sq > 0)
        if weights.kl > 0:
            kl = kl_loss(out.logits[:, :-1], t_out.logits[:, :-1])
            total = total + weights.kl * kl
            parts["kl"] = kl.item()
        if weights.sq > 0:  # blocks 1 … L−1, then the final-normed last hidden state (see the module docstring)
            sq = squarehead_loss(out.hidden_states[1:], t_out.hidden_states[1:])
            total = total + weights.sq * sq
            parts["sq"] = sq.item()
    return total, parts


@dataclass(frozen=True)
class FinetuneSchedule:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int = 10
    checkpoint_every: int = 0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then linear decay to zero."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - self.warmup_steps))


def finetune(
    ctx: RunContext,
    student: nn.Module,
    teacher: nn.Module | None,
    stream: torch.Tensor,
    weights: LossWeights,
    masks: dict[str, torch.Tensor],
    schedule: FinetuneSchedule,
    before_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune `student` (masks kept) against frozen `teacher` (None: CE only); the per-step log
    (`Cancelled` when cancelled). `before_step(step)` runs before each step's forward (e.g. to move a
    sparsity schedule)."""
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    for p in student.parameters():  # a student deep-copied from a frozen teacher inherits requires_grad=False
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay
    )
    generator = torch.Generator().manual_seed(ctx.seed)
    start, history = 0, []
    checkpoint = ctx.load_checkpoint() if schedule.checkpoint_every else None
    if checkpoint is not None:
        student.load_state_dict(checkpoint.state["model"])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        generator.set_state(checkpoint.state["generator"])
        start, history = int(checkpoint.state["step"]), list(checkpoint.state["history"])
    student.train()
    for step in range(start, schedule.steps):
        stop_if_cancelled(ctx)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        if before_step is not None:
            before_step(step)
        ids = random_windows(stream, schedule.batch_size, schedule.seq_len, generator).to(ctx.device)
        loss, parts = distillation_loss(student, teacher, ids, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        apply_masks(student, masks)
        row = {"loss": loss.item(), **parts}
        history.append(row)
        ctx.log(step + 1, **{f"train_{k}": v for k, v in row.items()})
        ctx.progress(step + 1, schedule.steps, f"step {step + 1}: loss {row['loss']:.4f}")
        if schedule.checkpoint_every and (step + 1) % schedule.checkpoint_every == 0:
            ctx.save_checkpoint(_state(student, optimizer, generator, step + 1, history), step + 1)
    student.eval()
    return history


def _state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "history": history,
    }
