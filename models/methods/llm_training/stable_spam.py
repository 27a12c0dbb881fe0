"""`stable-spam`: simulated 4-bit pre-training of a tiny Llama with Stable-SPAM.

Paper: Tianjin Huang, Haotian Hu, Zhenyu Zhang, Gaojie Jin, Xiang Li, Li Shen, Tianlong Chen, Lu Liu,
Qingsong Wen, Zhangyang Wang and Shiwei Liu, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
Adam" (arXiv 2502.17055, 2025). Reference code: https://github.com/TianjinYellow/StableSPAM
(`galore_torch/stablespam.py`), also shipped as `pytorch_optimizer.StableSPAM`.

Mechanism (Algorithm 1; the optimizer is `models/optim/stable_spam.py`), per weight tensor with gradient g
at global step t:

    AdaClip (Eq. 2):  M_t = θ M_{t−1} + (1−θ) max|g|,  M̂ = M_t/(1−θ^t);  entries with |g| > M̂ become g·M̂/max|g|
    AdaGN (Eq. 3):    m_t = γ₁ m_{t−1} + (1−γ₁)‖g‖,  v_t = γ₂ v_{t−1} + (1−γ₂)‖g‖²  (bias-corrected);
                      g ← (g/‖g‖) · m̂_t/(√v̂_t + ε)
    then Adam on g with bias correction and decoupled weight decay, and every ΔT steps a momentum reset
    (Adam's m = v = 0, its step counter back to 1), inherited from SPAM.

So a spike in one step can neither pass AdaClip's running maximum nor inflate the update's norm, and
multiplying the loss by a constant leaves the update unchanged (up to ε).

Defaults are the paper's INT4 settings: γ₁ = 0.7, γ₂ = 0.9, θ = 0.999, ΔT = 500 (its BF16 run uses
γ₁ = 0.85, γ₂ = 0.99999, ΔT = 1000). The 4-bit simulation (`models/nn/fake_quant.py`) follows the
paper's INT4 setup: INT4 weights in groups of 256 and INT4 input activations in groups of 64 in every
linear layer but the output head, straight-through gradients; the registered model holds the
full-precision master weights. lr, warm-up and cosine schedule are the shared pre-training loop's
(`models/lm_training.py`), not the paper's.

The reproduction follows the paper's INT4 LLaMA experiment (Figure 1 and Table 1): at a high learning
rate Adam and SPAM become unstable in 4-bit while Stable-SPAM keeps training and keeps the gradient norm
low. Ours is a 0.13M-parameter Llama on Python source for 200 steps instead of LLaMA-60M…1B on C4 for
thousands; the momentum-reset interval is scaled to the run's length.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from models.context import RunContext
from models.lm_training import (
    LMRun,
    LMTrainingParams,
    builtin_code_corpus,
    code_corpus,
    describe_runs,
    finish_lm_job,
    fresh_llama,
    train_lm,
)
from models.nn.fake_quant import quantize_linears
from models.optim import build_optimizer
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep


class StableSpamParams(LMTrainingParams):
    bits: int = Field(4, ge=2, le=16, description="simulated integer bits of weights and activations (16: off)")
    gamma1: float = Field(0.7, ge=0.0, lt=1.0, description="AdaGN first-moment decay of the gradient norm")
    gamma2: float = Field(0.9, ge=0.0, lt=1.0, description="AdaGN second-moment decay of the gradient norm")
    theta: float = Field(0.999, ge=0.0, lt=1.0, description="AdaClip decay of the running max |g|")
    reset_interval: int = Field(500, ge=1, description="ΔT: steps between momentum resets")
    model_name: str = Field("stable-spam-llama", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def quantized_llama(corpus, params: LMTrainingParams, seed: int, bits: int):
    model = fresh_llama(corpus, params, seed)
    return quantize_linears(model, bits=bits) if bits < 16 else model


@method(
    "stable-spam",
    family="llm-training",
    task="train",
    datasets=("text-corpus",),
    params=StableSpamParams,
    paper="Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
    tiny=dict(
        steps=3,
        batch_size=2,
        seq_len=16,
        max_documents=3,
        eval_windows=2,
        warmup_steps=1,
        vocab_size=300,
        reset_interval=2,
    ),
)
def run(ctx: RunContext, params: StableSpamParams) -> None:
    """Pre-train a (simulated) low-bit tiny Llama with Stable-SPAM; logs loss and gradient-norm traces."""
    corpus = code_corpus(ctx.dataset, params)
    model = quantized_llama(corpus, params, ctx.seed, params.bits)
    opt = build_optimizer(
        "stable-spam",
        model,
        lr=params.lr,
        weight_decay=params.weight_decay,
        gamma1=params.gamma1,
        gamma2=params.gamma2,
        theta=params.theta,
        reset_interval=params.reset_interval,
    )
    result = train_lm(model, opt, corpus, params, ctx.seed, ctx)
    # the registered folder holds the full-precision master weights (the QLinear swap shares them)
    finish_lm_job(ctx, model, corpus, result, params.model_name, {"method": "stable-spam", **params.model_dump()})


# -- reproduction -------------------------------------------------------------------------------

HIGH_LR, LOW_LR = 4e-3, 1e-3
GAP_NATS = 0.1


def optimizer_kwargs(name: str, reset_interval: int) -> dict:
    if name == "stable-spam":
        return {"reset_interval": reset_interval}
    if name == "spam":
        return {"update_proj_gap": reset_interval, "warmup_epoch": min(50, reset_interval // 2)}
    return {}


def why_not(high: dict[str, dict], holds: bool) -> str:
    """The measured reasons a miss is not the paper's failure mode (empty when the claim holds)."""
    if holds:
        return ""
    reasons = []
    if not any(high[n]["diverged"] for n in high):
        reasons.append(
            " No arm diverged at lr 4e-3 on this 0.13M-parameter model in so few steps, so the test "
            "reduces to final loss; the paper's INT4 runs, where Adam's loss spikes, are LLaMA models "
            "trained for thousands of steps."
        )
    if high["stable-spam"]["grad_norm_p99"] > min(high["adamw"]["grad_norm_p99"], high["spam"]["grad_norm_p99"]):
        reasons.append(
            " The p99 statistic is of the raw gradient, which AdaClip/AdaGN rescale only inside the "
            "update; the arms' raw gradient norms differ by trajectory, not by a spike the optimizer "
            "suppressed."
        )
    return "".join(reasons)


def final_loss(run: LMRun, vocab: int) -> float:
    """A run's held-out loss; a diverged run counts as ln V, the loss of a uniform guess over the vocabulary
    (a finite number for the per-seed statistics, and no better than any run that trained)."""
    return math.log(vocab) if run.diverged else run.val_loss


@reproduction(
    "stable-spam",
    claim="in simulated INT4 pre-training at a high learning rate (4e-3), Adam or SPAM "
    "diverges or ends ≥0.1 nats worse while Stable-SPAM does not, and Stable-SPAM has "
    "the lowest 99th-percentile gradient norm",
    metric="held-out loss (nats/token) at lr 4e-3, INT4",
    direction="lower",
    baseline="best of Adam and SPAM",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """A micro Llama with INT4 weights and activations (STE) pre-trained on stdlib-code with Adam, SPAM and
    Stable-SPAM at lr 4e-3, plus Adam at 1e-3 as the low-rate reference; no gradient clipping; the same
    batches and seed for every arm; three seeds (200 steps each).

    The baseline is whichever of Adam and SPAM at 4e-3 has the lower mean held-out loss over the seeds;
    the claim's further conditions are judged on the means over seeds: a baseline diverged in some seed
    or ends ≥0.1 nats above Stable-SPAM, Stable-SPAM diverged in none, and its 99th-percentile gradient
    norm is the lowest of the three."""
    params = (
        LMTrainingParams(steps=6, batch_size=4, seq_len=32, max_documents=8, eval_windows=2, warmup_steps=2)
        if smoke
        else LMTrainingParams(steps=200, warmup_steps=10)
    )
    reset_interval = 4 if smoke else 100
    seeds = seeds_for(seed, smoke)
    arms = (("adamw", LOW_LR), ("adamw", HIGH_LR), ("spam", HIGH_LR), ("stable-spam", HIGH_LR))
    corpus = builtin_code_corpus(params)
    vocab = len(corpus.tokenizer)
    runs: dict[str, list[LMRun]] = {}
    settings = [(name, lr, s) for name, lr in arms for s in seeds]
    for name, lr, s in sweep(ctx, settings, label=lambda x: f"{x[0]} at lr {x[1]:g} seed {x[2]}"):
        model = quantized_llama(corpus, params, s, bits=4)
        opt = build_optimizer(name, model, lr=lr, **optimizer_kwargs(name, reset_interval))
        runs.setdefault(f"{name} lr={lr:g}", []).append(train_lm(model, opt, corpus, params, s))
    table = describe_runs(runs)
    high = {name: table[f"{name} lr={HIGH_LR:g}"] for name in ("adamw", "spam", "stable-spam")}
    losses = {
        name: [final_loss(r, vocab) for r in runs[f"{name} lr={HIGH_LR:g}"]]
        for name in ("adamw", "spam", "stable-spam")
    }
    mean = {name: float(np.mean(v)) for name, v in losses.items()}
    baseline = min(("adamw", "spam"), key=lambda name: mean[name])
    ours = high["stable-spam"]
    unstable = any(high[b]["diverged"] or mean[b] >= mean["stable-spam"] + GAP_NATS for b in ("adamw", "spam"))
    lowest_spikes = ours["grad_norm_p99"] <= min(high["adamw"]["grad_norm_p99"], high["spam"]["grad_norm_p99"])
    holds = bool(unstable and not ours["diverged"] and lowest_spikes)

    def arm_text(n: str) -> str:
        diverged = f", diverged in {high[n]['diverged']:.0%} of seeds" if high[n]["diverged"] else ""
        return f"{n} loss {mean[n]:.3f} (p99 grad norm {high[n]['grad_norm_p99']:.2f}{diverged})"

    note = (
        f"at lr 4e-3, means over {len(seeds)} seed(s): "
        + ", ".join(arm_text(n) for n in high)
        + f"; Adam at lr 1e-3: loss {table[f'adamw lr={LOW_LR:g}']['val_loss']:.3f}. Baseline: "
        f"{'Adam' if baseline == 'adamw' else 'SPAM'}. Momentum reset every "
        f"{reset_interval} steps (the paper's 500 scaled to a {params.steps}-step run)." + why_not(high, holds)
    )
    return Outcome(
        ours=losses["stable-spam"],
        baseline=losses[baseline],
        holds=holds,
        note=note,
        details={"arms": table, "baseline_arm": baseline},
    )
