"""`flatness`: same pre-training loss, different downstream accuracy, and the Hessian trace that tells them apart.

Paper: Hong Liu, Sang Michael Xie, Zhiyuan Li and Tengyu Ma, "Same Pre-training Loss, Better Downstream:
Implicit Bias Matters for Language Models", ICML 2023 (arXiv 2210.14199). No reference code was found;
the grammar, the training recipes and the measurements here are ours.

The paper's synthetic-language experiments (Section 3): tiny language models are pre-trained on text from a
PCFG until their loss reaches the generator's entropy (the optimal loss), and models at that same loss are
then made to differ by (i) training on past convergence, (ii) model size and (iii) the training algorithm.
Downstream tasks are defined on the latent structure of the generator, and flatness is the trace of the
Hessian of the pre-training loss, Tr ∇²L(θ) (Section 4; SGD noise implicitly minimises it on the manifold of
minimisers), which tracks downstream accuracy where the pre-training loss, equal for all, cannot.

Here: the language is a layered LL(1) PCFG (`models/llm/synthetic_grammar.py`), whose optimal per-token loss
is known exactly; the models are the stock tiny `LlamaForCausalLM` (`models/llm/model.py`), trained on fresh
sentences every step (the population loss, as in the paper); Tr ∇²L is Hutchinson's estimate,
Tr H ≈ mean over Rademacher v of vᵀHv with Hessian-vector products by double backward
(`models/hessian.py`), on held-out sentences (eager attention: SDPA's CPU kernel has no double backward);
the downstream tasks are linear probes of the final hidden state at each token for the generator's latent
`parent` (the nonterminal that emitted the token), `grandparent` (the one that created the parent) and `depth`
(nonterminals still pending), trained on few labelled sentences, so that how linearly the representation
exposes the structure decides the accuracy. The paper's own PCFG and downstream tasks are not reproduced
(we could not confirm their exact construction); these are our reconstruction on the same latent
structure. Defaults (a 3-level grammar of 10 terminals, AdamW at a constant 2e-3 after 50 warm-up steps,
batches of 64 sentences, measurements at 300, 600 and 900 steps, 8 Hutchinson probes on 128 sentences)
are ours, sized for CPU runs of a minute or two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field, field_validator
from scipy.stats import spearmanr
from transformers import LlamaForCausalLM

from models.context import RunContext, stop_if_cancelled
from models.hessian import TraceEstimate, hutchinson_trace
from models.llm.attention.measure import attention_implementation
from models.llm.model import SizeName, build_model, llama_config, parameter_count
from models.llm.synthetic_grammar import LL1Grammar, layered_grammar
from models.optim import OptimizerName, build_optimizer
from models.params import TrainingScheduleParams
from models.plots import curves_figure
from models.registry import method
from models.representation.evaluation import linear_probe_accuracy
from models.reproduction import Outcome, reproduction, seeds_for, sweep

EOS, PAD, FIRST_TERMINAL = 0, 1, 2  # token ids: <eos> (also the sentence start), <pad>, then the terminals
TASKS = ("parent", "grandparent", "depth")


class FlatnessParams(TrainingScheduleParams):
    lr: float = Field(
        2e-3,
        gt=0.0,
        le=10.0,
        description="learning rate after warm-up (constant: the noise that flattens keeps acting past convergence)",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="fresh sentences per step")
    levels: int = Field(3, ge=2, le=8, description="grammar levels (sentence length ≤ 2^levels − 1)")
    per_level: int = Field(4, ge=1, le=64, description="nonterminals per level below the start symbol")
    num_terminals: int = Field(10, ge=2, le=4096)
    rules_per_nonterminal: int = Field(3, ge=1, le=64, description="rules per nonterminal (distinct first terminals)")
    grammar_seed: int = Field(0, ge=0, description="seed of the random grammar (the language, not the model)")
    size: SizeName = Field("micro", description="tiny Llama size (models/llm/model.py)")
    optimizer: OptimizerName = Field("adamw", description="pre-training optimizer (models/optim registry)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="momentum when optimizer is sgd")
    beta2: float = Field(0.98, ge=0.0, lt=1.0, description="second-moment decay when optimizer is adamw")
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(
        1.0,
        ge=0.0,
        description="global gradient-norm clip (0: none); keeps Adam's loss spikes from landing on a measurement",
    )
    measure_at: list[int] = Field(
        [300, 600, 900], description="steps at which loss, Tr H and probes are measured (the last is the run's length)"
    )
    eval_sentences: int = Field(1024, ge=16, description="held-out sentences for the pre-training loss")
    hessian_sentences: int = Field(128, ge=1, description="held-out sentences the Hessian trace is taken on")
    hessian_probes: int = Field(8, ge=1, le=1000, description="Rademacher probes of Hutchinson's estimator")
    probe_train_sentences: int = Field(20, ge=2, description="labelled sentences a downstream probe is fit on")
    probe_test_sentences: int = Field(300, ge=2)

    @field_validator("measure_at")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 1:
            raise ValueError("measure_at must be a non-empty increasing list of positive steps")
        return v


@dataclass
class Measurement:
    """One model at one step: the claim's three quantities plus the probes' accuracies per task."""

    label: str
    step: int
    loss: float
    optimal_loss: float
    trace: TraceEstimate
    probe: dict[str, float]
    parameters: int

    @property
    def gap(self) -> float:
        return self.loss - self.optimal_loss

    @property
    def downstream(self) -> float:
        return float(np.mean(list(self.probe.values())))

    def row(self) -> dict[str, float | str | int]:
        return {
            "model": self.label,
            "step": self.step,
            "loss": round(self.loss, 5),
            "gap": round(self.gap, 5),
            "trace": round(self.trace.mean, 3),
            "trace_stderr": round(self.trace.stderr, 3),
            "downstream": round(self.downstream, 4),
            **{f"probe_{k}": round(v, 4) for k, v in self.probe.items()},
            "parameters": self.parameters,
        }


# -- data -------------------------------------------------------------------------------------------


def grammar_of(params: FlatnessParams) -> LL1Grammar:
    return layered_grammar(
        params.levels, params.per_level, params.num_terminals, params.rules_per_nonterminal, seed=params.grammar_seed
    )


def encode(sentences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<eos> x₁ … x_T <eos>` right-padded; labels are the ids with padding ignored (−100)."""
    width = max(len(s) for s in sentences) + 2
    ids = torch.full((len(sentences), width), PAD, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, : len(s) + 2] = torch.tensor([EOS, *(t + FIRST_TERMINAL for t in s), EOS])
    labels = ids.masked_fill(ids == PAD, -100)
    return ids, labels


def sentences(grammar: LL1Grammar, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [grammar.sample(rng) for _ in range(n)]


@dataclass(frozen=True)
class HeldOut:
    """Fixed held-out sets, drawn from seeds disjoint from the training stream's."""

    loss: tuple[torch.Tensor, torch.Tensor]
    hessian: tuple[torch.Tensor, torch.Tensor]
    probe_train: list[list[int]]
    probe_test: list[list[int]]

    @classmethod
    def draw(cls, grammar: LL1Grammar, params: FlatnessParams) -> HeldOut:
        return cls(
            encode(sentences(grammar, params.eval_sentences, 10_001)),
            encode(sentences(grammar, params.hessian_sentences, 10_002)),
            sentences(grammar, params.probe_train_sentences, 10_003),
            sentences(grammar, params.probe_test_sentences, 10_004),
        )


# -- model and training ---------------------------------------------------------------------------


def fresh_model(grammar: LL1Grammar, size: SizeName, seed: int) -> LlamaForCausalLM:
    return build_model(
        llama_config(size, grammar.num_terminals + FIRST_TERMINAL, eos_token_id=EOS, pad_token_id=PAD), seed
    )


def optimizer_for(model: torch.nn.Module, params: FlatnessParams) -> torch.optim.Optimizer:
    extra = {"sgd": {"momentum": params.momentum}, "adamw": {"betas": (0.9, params.beta2)}}.get(params.optimizer, {})
    return build_optimizer(params.optimizer, model, lr=params.lr, weight_decay=params.weight_decay, **extra)


def pretrain(
    model: LlamaForCausalLM,
    grammar: LL1Grammar,
    params: FlatnessParams,
    seed: int,
    at_step: Callable[[int], None],
    ctx: RunContext | None = None,
) -> list[float]:
    """Train on fresh sentences (linear warm-up, then a constant rate); `at_step(s)` runs at each of
    `params.measure_at`. Returns the training losses (`Cancelled` when `ctx` is)."""
    opt = optimizer_for(model, params)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for step in range(1, params.measure_at[-1] + 1):
        if ctx is not None:
            stop_if_cancelled(ctx)
        for group in opt.param_groups:
            group["lr"] = params.lr * min(1.0, step / max(1, params.warmup_steps))
        ids, labels = encode([grammar.sample(rng) for _ in range(params.batch_size)])
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step in params.measure_at:
            at_step(step)
    return losses


# -- the three measurements -----------------------------------------------------------------------


@torch.no_grad()
def pretraining_loss(model: LlamaForCausalLM, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    return model(input_ids=batch[0], labels=batch[1]).loss.item()


def hessian_trace(
    model: LlamaForCausalLM, batch: tuple[torch.Tensor, torch.Tensor], probes: int, seed: int
) -> TraceEstimate:
    """Tr ∇²L of the mean next-token loss on `batch` (every parameter; tied embeddings counted once)."""
    model.eval()  # no dropout in the tiny Llama; eval() only keeps the measurement deterministic
    with attention_implementation(model, "eager"):
        return hutchinson_trace(
            lambda: model(input_ids=batch[0], labels=batch[1]).loss,
            list(model.parameters()),
            probes,
            torch.Generator().manual_seed(seed),
        )


@torch.no_grad()
def token_features(
    model: LlamaForCausalLM, grammar: LL1Grammar, sents: list[list[int]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The final hidden state at every terminal token and the generator's latent labels there."""
    model.eval()
    ids, _ = encode(sents)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    feats, labels = [], {t: [] for t in TASKS}
    for i, s in enumerate(sents):
        feats.append(hidden[i, 1 : len(s) + 1].numpy())
        parse = grammar.parse(s)
        for task in TASKS:
            labels[task].extend(getattr(parse, task))
    return np.concatenate(feats), {k: np.asarray(v) for k, v in labels.items()}


def probe_accuracy(model: LlamaForCausalLM, grammar: LL1Grammar, held: HeldOut) -> dict[str, float]:
    """Downstream accuracy: a linear probe per latent task, fit on few sentences, scored on others."""
    train_z, train_y = token_features(model, grammar, held.probe_train)
    test_z, test_y = token_features(model, grammar, held.probe_test)
    return {t: linear_probe_accuracy(train_z, train_y[t], test_z, test_y[t]) for t in TASKS}


def measure(
    label: str,
    step: int,
    model: LlamaForCausalLM,
    grammar: LL1Grammar,
    held: HeldOut,
    params: FlatnessParams,
    seed: int,
) -> Measurement:
    return Measurement(
        label,
        step,
        pretraining_loss(model, held.loss),
        grammar.optimal_loss(),
        hessian_trace(model, held.hessian, params.hessian_probes, seed),
        probe_accuracy(model, grammar, held),
        parameter_count(model),
    )


def train_and_measure(
    label: str, params: FlatnessParams, seed: int, grammar: LL1Grammar, held: HeldOut, ctx: RunContext | None = None
) -> tuple[list[Measurement], list[float]]:
    """One recipe from scratch, measured at every step of `params.measure_at` (`Cancelled` when `ctx` is)."""
    model = fresh_model(grammar, params.size, seed)
    out: list[Measurement] = []

    def at_step(step: int) -> None:
        out.append(measure(f"{label}@{step}", step, model, grammar, held, params, seed))
        if ctx is not None:
            m = out[-1]
            ctx.log(
                step,
                loss=m.loss,
                loss_gap=m.gap,
                hessian_trace=m.trace.mean,
                hessian_trace_stderr=m.trace.stderr,
                downstream=m.downstream,
                **{f"probe_{k}": v for k, v in m.probe.items()},
            )
            ctx.progress(step, params.measure_at[-1], f"{label} step {step}: gap {m.gap:.4f}, Tr H {m.trace.mean:.1f}")

    return out, pretrain(model, grammar, params, seed, at_step, ctx)


@method(
    "flatness",
    family="llm-training",
    task="analyze",
    datasets=(),
    params=FlatnessParams,
    paper="Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models",
    tiny=dict(
        levels=2,
        measure_at=[2, 4],
        batch_size=4,
        warmup_steps=1,
        eval_sentences=16,
        hessian_sentences=4,
        hessian_probes=1,
        probe_train_sentences=6,
        probe_test_sentences=6,
    ),
)
def run(ctx: RunContext, params: FlatnessParams) -> None:
    """Pre-train a tiny Llama on a synthetic PCFG language; log loss vs the exact optimum, Tr H and probe accuracy."""
    grammar = grammar_of(params)
    ctx.log(0, optimal_loss=grammar.optimal_loss(), expected_length=grammar.expected_length())
    measurements, losses = train_and_measure(
        params.optimizer, params, ctx.seed, grammar, HeldOut.draw(grammar, params), ctx
    )
    ctx.save_artifact(
        "measurements.json",
        {"optimal_loss": grammar.optimal_loss(), "models": [m.row() for m in measurements]},
        kind="table",
    )
    steps = list(range(1, len(losses) + 1))
    ctx.save_artifact(
        "curves.png",
        curves_figure(
            {
                "train loss − optimal (nats/token)": {"train": (steps, [x - grammar.optimal_loss() for x in losses])},
                "Tr ∇²L": {
                    "held-out": (
                        [m.step for m in measurements],
                        [m.trace.mean for m in measurements],
                        [m.trace.stderr for m in measurements],
                    )
                },
                "probe accuracy": {
                    t: ([m.step for m in measurements], [m.probe[t] for m in measurements]) for t in TASKS
                },
            },
            "step",
            title=f"flatness: {params.size} Llama, {params.optimizer}",
        ),
        kind="plot",
    )


# -- reproduction -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """A recipe of the comparison: continued training, a larger model, or another optimizer."""

    label: str
    overrides: dict = field(default_factory=dict)


def arms() -> tuple[Arm, ...]:
    return (
        Arm("adamw-micro"),
        Arm("adamw-tiny", {"size": "tiny"}),
        Arm("adafactor-micro", {"optimizer": "adafactor", "lr": 1e-2}),
    )


def rank_correlation(x: list[float], y: list[float]) -> float:
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else 0.0


CONVERGED_NATS = 0.02  # "the same (optimal) loss": within this of the generator's entropy (our tolerance)
MIN_MODELS = 6
MIN_SPEARMAN = 0.6


def protocol(smoke: bool) -> FlatnessParams:
    """The shared recipe; every arm trains to the first measurement (convergence), then on."""
    if smoke:
        return FlatnessParams(
            levels=2,
            measure_at=[2, 4],
            batch_size=4,
            warmup_steps=1,
            eval_sentences=16,
            hessian_sentences=4,
            hessian_probes=1,
            probe_train_sentences=6,
            probe_test_sentences=6,
        )
    return FlatnessParams()


def arm_params(base: FlatnessParams, arm: Arm) -> FlatnessParams:
    """The larger model and the other optimizer are measured at convergence and at twice that: the
    continued-training arm (the baseline recipe) runs the full schedule."""
    if not arm.overrides:
        return base
    return base.model_copy(update={**arm.overrides, "measure_at": base.measure_at[:2]})


def correlations(models: list[Measurement]) -> tuple[float, float]:
    """Spearman(−Tr H, downstream) and Spearman(−loss, downstream): does flatness, or the loss, rank transfer?"""
    down = [m.downstream for m in models]
    return (rank_correlation([-m.trace.mean for m in models], down), rank_correlation([-m.loss for m in models], down))


def why_not(models: list[Measurement], test_tokens: int) -> str:
    """What the measurements say about a miss: how much room the probes left, and where the sharpest model sat."""
    down = [m.downstream for m in models]
    stderr = math.sqrt(max(np.mean(down) * (1 - np.mean(down)), 1e-12) / test_tokens)
    sharpest = max(models, key=lambda m: m.trace.mean)
    median = float(np.median(down))
    return (
        f" Among the same-loss models probe accuracy spans {min(down):.3f}–{max(down):.3f} (binomial s.e. of one "
        f"accuracy ≈ {stderr:.3f} over {test_tokens} test tokens). The sharpest ({sharpest.label}, Tr H "
        f"{sharpest.trace.mean:.0f}) reaches probe accuracy {sharpest.downstream:.3f} against a median of "
        f"{median:.3f}"
        + (
            ": at this scale a model at the optimal loss exposes the parse linearly however sharp its minimum."
            if sharpest.downstream >= median
            else "."
        )
    )


@dataclass(frozen=True)
class SeedSweep:
    """One seed's sweep over the recipes: its models and the claim's statistics over them."""

    runs: dict[str, list[Measurement]]

    @property
    def models(self) -> list[Measurement]:
        return [m for ms in self.runs.values() for m in ms]

    @property
    def same_loss(self) -> list[Measurement]:
        return [m for m in self.models if m.gap <= CONVERGED_NATS]

    @property
    def spread(self) -> float:
        losses = [m.loss for m in self.same_loss]
        return max(losses) - min(losses) if losses else float("nan")

    @property
    def continued(self) -> tuple[Measurement, Measurement]:
        """The continued-training arm at convergence and at the end."""
        return self.runs["adamw-micro"][0], self.runs["adamw-micro"][-1]

    def summary(self, seed: int) -> str:
        rho_trace, rho_loss = correlations(self.same_loss)
        first, last = self.continued
        return (
            f"seed {seed}: {len(self.same_loss)} of {len(self.models)} models within {CONVERGED_NATS} nats (loss "
            f"spread {self.spread:.4f}), Spearman with probe accuracy −Tr H {rho_trace:.2f} vs −loss {rho_loss:.2f}, "
            f"continued AdamW training Tr H {first.trace.mean:.1f} → {last.trace.mean:.1f}, probe "
            f"{first.downstream:.3f} → {last.downstream:.3f}"
        )


@reproduction(
    "flatness",
    claim="among tiny Llamas at the same near-optimal pre-training loss on a synthetic PCFG "
    "language (made to differ by continued training, model size and optimizer), the "
    "flatter ones (lower Hutchinson Tr ∇²L) transfer better: Spearman(−Tr H, probe "
    "accuracy) ≥ 0.6 and above the loss's own rank correlation, and Tr H falls with "
    "continued training",
    metric="Spearman rank correlation with downstream probe accuracy",
    direction="higher",
    baseline="Spearman(−pre-training loss, probe accuracy)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """One grammar (exact optimal loss), three recipes from the same seed: AdamW micro Llama measured at
    convergence (300 steps) and after 2× and 3× the steps; a tiny Llama (d=128, 4 layers) with AdamW and a micro
    one with Adafactor, each at convergence and 2×. Every model: held-out loss against the exact optimum, Tr H
    (8 Rademacher probes on 128 held-out sentences), linear probes (20 labelled sentences) of `parent`,
    `grandparent` and `depth`.

    The rank correlations are taken over one seed's sweep of seven models, once per seed (three seeds), so
    ours and the baseline are paired per seed. The claim's further conditions: every seed has at least six
    models at the optimal loss, the mean Spearman(−Tr H, probe accuracy) is ≥ 0.6, and continued training
    lowers Tr H on average over the seeds.

    SGD with momentum (lr 0.1 and 0.3 tried) stayed ≥0.04 nats above the optimum in 600 steps or spiked, so
    the other-optimizer arm is Adafactor (torch's), which reaches the same loss as AdamW."""
    base = protocol(smoke)
    grammar = grammar_of(base)
    held = HeldOut.draw(grammar, base)
    seeds = seeds_for(seed, smoke)
    runs: dict[int, dict[str, list[Measurement]]] = {s: {} for s in seeds}
    for s, arm in sweep(ctx, [(s, arm) for s in seeds for arm in arms()], label=lambda x: f"{x[1].label} seed {x[0]}"):
        runs[s][arm.label] = train_and_measure(arm.label, arm_params(base, arm), s, grammar, held)[0]
    sweeps = {s: SeedSweep(runs[s]) for s in seeds}
    rhos = [correlations(sweeps[s].same_loss) for s in seeds]
    rho_trace, rho_loss = [r[0] for r in rhos], [r[1] for r in rhos]
    enough = all(len(sweeps[s].same_loss) >= MIN_MODELS for s in seeds)
    flattens = (
        float(np.mean([last.trace.mean - first.trace.mean for first, last in (sweeps[s].continued for s in seeds)])) < 0
    )
    holds = bool(enough and float(np.mean(rho_trace)) >= MIN_SPEARMAN and flattens)
    note = (
        f"optimal loss {grammar.optimal_loss():.4f} nats/token; "
        + "; ".join(sweeps[s].summary(s) for s in seeds)
        + ". Spearman over each seed's models at the optimal loss."
    )
    if not enough:
        note += f" In some seed fewer than {MIN_MODELS} models reached the optimal loss within {CONVERGED_NATS} nats."
    pooled = [m for s in seeds for m in sweeps[s].same_loss]
    if not holds and pooled:
        note += why_not(pooled, sum(map(len, held.probe_test)))
    return Outcome(
        ours=rho_trace,
        baseline=rho_loss,
        holds=holds,
        note=note,
        details={
            "optimal_loss": grammar.optimal_loss(),
            "models": {str(s): [m.row() for m in sweeps[s].models] for s in seeds},
            "same_loss_models": {str(s): [m.label for m in sweeps[s].same_loss] for s in seeds},
        },
    )
