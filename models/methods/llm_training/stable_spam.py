"""`stable-spam`: simulated 4-bit pre-training of a tiny Llama with Stable-SPAM (Huang et al. 2025).

The optimizer is `models/optim/stable_spam.py` (AdaClip, AdaGN, periodic momentum reset); the 4-bit
simulation is `models/nn/fake_quant.py` (INT4 weights in groups of 256 and INT4 input activations in
groups of 64 in every linear layer but the output head, straight-through gradients). The reproduction
follows the paper's INT4 LLaMA experiment (Figure 1 and Table 1): at a high learning rate Adam and SPAM
become unstable in 4-bit while Stable-SPAM keeps training and keeps the gradient norm low.
"""

from __future__ import annotations

from pydantic import Field

from models.context import RunContext, cpu_threads
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
from models.reproduction import Outcome, reproduction


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
)
def run(ctx: RunContext, params: StableSpamParams) -> None:
    """Pre-train a (simulated) low-bit tiny Llama with Stable-SPAM; logs loss and gradient-norm traces."""
    with cpu_threads(ctx.resources):
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
    if result is not None:
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
    batches and seed for every arm."""
    params = (
        LMTrainingParams(steps=6, batch_size=4, seq_len=32, max_documents=8, eval_windows=2, warmup_steps=2)
        if smoke
        else LMTrainingParams(steps=200, warmup_steps=10)
    )
    reset_interval = 4 if smoke else 100
    runs: dict[str, list[LMRun]] = {}
    arms = (("adamw", LOW_LR), ("adamw", HIGH_LR), ("spam", HIGH_LR), ("stable-spam", HIGH_LR))
    with cpu_threads(ctx.resources):
        corpus = builtin_code_corpus(params)
        for name, lr in arms:
            if ctx.cancelled():
                raise InterruptedError("reproduction cancelled")
            model = quantized_llama(corpus, params, seed, bits=4)
            opt = build_optimizer(name, model, lr=lr, **optimizer_kwargs(name, reset_interval))
            runs[f"{name} lr={lr:g}"] = [train_lm(model, opt, corpus, params, seed)]
            ctx.progress(len(runs), len(arms), f"{name} at lr {lr:g}")
    table = describe_runs(runs)
    high = {name: table[f"{name} lr={HIGH_LR:g}"] for name in ("adamw", "spam", "stable-spam")}
    ours = high["stable-spam"]
    baseline = min(high["adamw"]["val_loss"], high["spam"]["val_loss"])
    unstable = any(high[b]["diverged"] or high[b]["val_loss"] >= ours["val_loss"] + GAP_NATS for b in ("adamw", "spam"))
    lowest_spikes = ours["grad_norm_p99"] <= min(high["adamw"]["grad_norm_p99"], high["spam"]["grad_norm_p99"])
    holds = bool(unstable and not ours["diverged"] and lowest_spikes)
    note = (
        "at lr 4e-3: "
        + ", ".join(
            f"{n} loss {high[n]['val_loss']:.3f} (p99 grad norm {high[n]['grad_norm_p99']:.2f}"
            f"{', diverged' if high[n]['diverged'] else ''})"
            for n in high
        )
        + f"; Adam at lr 1e-3: loss {table[f'adamw lr={LOW_LR:g}']['val_loss']:.3f}. Momentum reset every "
        f"{reset_interval} steps (the paper's 500 scaled to a {params.steps}-step run)." + why_not(high, holds)
    )
    return Outcome(ours=ours["val_loss"], baseline=baseline, seeds=1, holds=holds, note=note, details={"arms": table})
