"""N:M sparse training with progressive gradient flow (decaying masks).

Paper: Abhimanyu Rajeshkumar Bambhaniya, Amir Yazdanbakhsh, Suvinay Subramanian, Sheng-Chun Kao, Shivani
Agrawal, Utku Evci and Tushar Krishna, "Progressive Gradient Flow for Robust N:M Sparsity Training in
Transformers", arXiv:2402.04744 (2024; CPAL 2025). Reference code:
https://github.com/abhibambhaniya/progressive_gradient_flow_nm_sparsity
(`timm/sparse_pruning/sparse_functions.py`).

Training an N:M-sparse transformer from scratch recomputes a magnitude mask m (top-N of every M
consecutive input weights of a row) at every step. SR-STE (Zhou et al. 2021), the baseline, runs the
forward pass with m⊙W and sends the dense gradient straight through, plus a decay λ(1−m)⊙W on the
pruned weights (λ = 2e-4). At high sparsity (≥80%) the paper finds this gradient flow too abrupt —
pruned weights receive noisy gradients yet never contribute — and proposes MDGF (mask-decay gradient
flow), a *decaying* mask:

    W̃ = W ⊙ (m + (1 − m)·β(t)),    ∂L/∂W := ∂L/∂W̃ (straight through),

with β(t) = e^{−κt} (MDGF-Exp) or max(0, 1 − t/T_d) (MDGF-Linear), so pruned weights fade out gradually;
the last phase uses the binary mask (β = 0) to fine-tune the final sparse model. β = 1 is the dense model
and β = 0 has exactly N nonzeros per group (the unit tests). Checked against the reference
(ExponentialDecay / LinearDecay / SparseSRSTE: same forward, same straight-through backward, same λ,
row-wise groups). The paper's structure-decay variant (SDGF) is not implemented.

Schedule, our rescaling: the paper decays with κ = 1e-4 per step over ImageNet-length runs; here
κ = ln 100 / (0.65·T), i.e. β falls to 0.01 at 65% of the T steps, and the final 15% of steps are the
binary fine-tune phase (MDGF-Linear reaches 0 at 0.65·T). The paper's vision setting (ViT-B, FF at 1:32
and QKV at 1:8) becomes a language model: the kit's `micro` Llama with its FFN widened to 4d so every
width splits into groups of 16 and 32, trained from scratch on stdlib-code with the MLP projections at
`nm_ff` (1:16) and the attention projections at `nm_attn` (1:8) — ≈92% of the block linears' weights
pruned — by AdamW (β = 0.9/0.95) with a linear warm-up over 20 steps and linear decay (300 steps of
8×64 tokens, lr 3e-3: ours, about ten CPU seconds per run). The finished model is registered as a standard
HF folder with the masks folded into the weights. The reproduction trains MDGF-Exp and SR-STE from the
same initialisation and batches per seed (plus one dense run for scale).
"""

from __future__ import annotations

import math
import statistics
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from models.context import InMemoryRunContext, RunContext
from models.datasets import load_builtin
from models.llm.base import base_model_name, model_folder
from models.llm.compression.calibration import block_linears
from models.llm.compression.job import register_compressed
from models.llm.compression.oneshot import linear_name
from models.llm.compression.pruning import SparsityPattern, nm_mask
from models.llm.compression.storage import LinearFormat, packed_bytes
from models.llm.data import split_windows, token_stream
from models.llm.distillation import FinetuneSchedule, LossWeights, finetune
from models.llm.evaluation import perplexity
from models.llm.folder import CausalLM, decoder_layers, load_folder
from models.llm.model import SIZES, SizeName, build_model, llama_config
from models.params import ResumableParams, StepTrainingParams
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

Recipe = Literal["mdgf-exp", "mdgf-linear", "srste", "dense"]
NM_PATTERN = r"^\d+:\d+$"


class _DecayingMask(torch.autograd.Function):
    """Forward W ⊙ (m + (1 − m)β); backward the upstream gradient unchanged (MDGF)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, keep: torch.Tensor, beta: float) -> torch.Tensor:  # type: ignore[override]
        return weight * (keep + (~keep) * beta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


class _SRSTE(torch.autograd.Function):
    """Forward m ⊙ W; backward g + λ(1 − m) ⊙ W (sparse-refined straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight, keep)
        ctx.decay = decay
        return weight * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weight, keep = ctx.saved_tensors
        return grad + ctx.decay * (~keep) * weight, None, None


class NMGradientFlow(nn.Module):
    """A weight parametrization: the step's magnitude N:M mask, applied as MDGF (with `beta`) or SR-STE."""

    def __init__(self, n: int, m: int, recipe: Recipe, srste_decay: float = 2e-4):
        super().__init__()
        self.n, self.m, self.recipe, self.srste_decay = n, m, recipe, srste_decay
        self.beta = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        keep = nm_mask(weight.detach().abs(), self.n, self.m)
        if self.recipe == "srste":
            return _SRSTE.apply(weight, keep, self.srste_decay)
        return _DecayingMask.apply(weight, keep, self.beta)


def beta_at(
    step: int, total: int, recipe: Recipe, decay_fraction: float = 0.65, finetune_fraction: float = 0.15
) -> float:
    """β(t): 1 → 0.01 by `decay_fraction`·T (exponential, κ = ln 100/(0.65T)) or 1 → 0 (linear); 0 in the
    final `finetune_fraction` of training (binary mask); always 0 for SR-STE (its forward is binary)."""
    if recipe == "srste" or step >= (1.0 - finetune_fraction) * total:
        return 0.0
    horizon = decay_fraction * total
    if recipe == "mdgf-exp":
        return math.exp(-math.log(100.0) / horizon * step)
    return max(0.0, 1.0 - step / horizon)


def sparsify(model: nn.Module, nm_ff: str, nm_attn: str, recipe: Recipe) -> dict[str, NMGradientFlow]:
    """Parametrize every block linear: MLP projections at `nm_ff`, attention projections at `nm_attn`."""
    flows = {}
    for layer, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            pattern = SparsityPattern.parse(nm_ff if name.startswith("mlp.") else nm_attn)
            flow = NMGradientFlow(pattern.n, pattern.m, recipe)
            parametrize.register_parametrization(linear, "weight", flow)
            flows[linear_name(layer, name)] = flow
    return flows


def finalize(model: nn.Module, flows: dict[str, NMGradientFlow]) -> None:
    """Fold the binary masks into the weights (β = 0) and drop the parametrizations: a plain N:M model."""
    modules = dict(model.named_modules())
    for name, flow in flows.items():
        flow.beta = 0.0
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)


class PGFParams(StepTrainingParams, ResumableParams):
    recipe: Recipe = Field(
        "mdgf-exp",
        description="mdgf-exp / mdgf-linear (decaying mask, the paper), srste (the baseline) or dense (no sparsity)",
    )
    nm_ff: str = Field("1:16", pattern=NM_PATTERN, description="N:M of the MLP projections")
    nm_attn: str = Field("1:8", pattern=NM_PATTERN, description="N:M of the attention projections")
    size: SizeName = Field("micro", description="model size (FFN widened to 4d so widths split into groups of M)")
    steps: int = Field(300, ge=1, le=1_000_000, description="training steps")
    batch_size: int = Field(8, ge=1, le=1024, description="windows per step")
    seq_len: int = Field(64, ge=8, le=4096, description="tokens per window")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate (linear warm-up and decay)")
    train_tokens: int = Field(300_000, ge=1000, description="training tokens from the start of the train split")
    eval_windows: int = Field(32, ge=1, le=4096, description="val windows for perplexity")
    tokenizer_model: str = Field("", description="model whose tokenizer to use (empty: the cached base model's)")
    checkpoint_every: int = Field(100, ge=0, description="save a checkpoint every N steps (0: never)")
    output_name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})?$", description="registered name")


def train_nm(ctx: RunContext, params: PGFParams, smoke: bool = False) -> tuple[CausalLM, dict[str, float]]:
    """Train a sparse Llama from scratch by the params' recipe; (finished model, metrics)."""
    tokenizer = load_folder(model_folder(ctx, params.tokenizer_model, smoke)).tokenizer
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    stream = token_stream(tokenizer, ds.train["text"], max_tokens=params.train_tokens)
    evaluation = split_windows(tokenizer, ds.val["text"], params.seq_len, params.eval_windows)
    config = llama_config(
        params.size, len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config.intermediate_size = 4 * SIZES[params.size].hidden_size
    model = build_model(config, ctx.seed)
    flows = sparsify(model, params.nm_ff, params.nm_attn, params.recipe) if params.recipe != "dense" else {}

    def set_beta(step: int) -> None:
        beta = beta_at(step, params.steps, params.recipe)
        for flow in flows.values():
            flow.beta = beta
        if step % 10 == 0:
            ctx.log(step + 1, beta=beta)

    schedule = FinetuneSchedule(
        params.steps,
        params.batch_size,
        params.seq_len,
        params.lr,
        warmup_steps=min(20, params.steps),
        checkpoint_every=params.checkpoint_every,
        weight_decay=params.weight_decay,
    )
    finetune(ctx, model, None, stream, LossWeights(1.0, 0.0, 0.0), {}, schedule, set_beta)
    finalize(model, flows)
    ff, attn = SparsityPattern.parse(params.nm_ff), SparsityPattern.parse(params.nm_attn)
    formats = {name: LinearFormat(pattern=ff if ".mlp." in name else attn) for name in flows}
    metrics = {
        "val_ppl": perplexity(model, evaluation),
        "packed_bytes": packed_bytes(model, formats),
        "linear_density": _density(model, flows),
    }
    return CausalLM(model.eval(), tokenizer, None), metrics


def _density(model: nn.Module, flows: dict[str, NMGradientFlow]) -> float:
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in flows] or [p for n, p in model.named_parameters() if "layers" in n]
    return float(sum((w != 0).sum().item() for w in weights) / sum(w.numel() for w in weights))


@method(
    "nm-pgf",
    family="llm-compression",
    task="train",
    datasets=("text-corpus",),
    params=PGFParams,
    paper="Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers",
    tiny={
        "steps": 3,
        "batch_size": 2,
        "seq_len": 16,
        "train_tokens": 2000,
        "eval_windows": 2,
        "checkpoint_every": 0,
        "tokenizer_model": base_model_name(smoke=True),
    },
)
def run(ctx: RunContext, params: PGFParams) -> None:
    """Train an N:M-sparse Llama with a decaying mask (MDGF) or SR-STE; register the finished sparse model."""
    lm, metrics = train_nm(ctx, params)
    ctx.log(params.steps, **metrics)
    name = params.output_name or f"nm-pgf-{params.recipe}-{params.nm_ff.replace(':', 'of')}"
    ref = register_compressed(
        ctx, lm, None, "nm-pgf", params, metrics, name, {"nm_ff": params.nm_ff, "nm_attn": params.nm_attn}
    )
    ctx.progress(params.steps, params.steps, f"registered {ref}: val ppl {metrics['val_ppl']:.2f}")


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "nm-pgf",
    claim="at ≥80% sparsity (FF 1:16, attention 1:8) the decaying mask (MDGF-Exp) trains a better "
    "N:M model than SR-STE: mean val ppl over seeds MDGF-Exp ≤ SR-STE",
    metric="val perplexity of the finished N:M model (mean over seeds)",
    direction="lower",
    baseline="SR-STE",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Micro Llama from scratch on stdlib-code, per seed MDGF-Exp and SR-STE from the same initialisation and
    batches, plus one dense run for scale."""
    budget = (
        {"steps": 4, "batch_size": 2, "seq_len": 16, "train_tokens": 2000, "eval_windows": 2}
        if smoke
        else {"steps": 300, "batch_size": 8, "seq_len": 64, "train_tokens": 300_000, "eval_windows": 32}
    )
    seeds = seeds_for(seed, smoke)
    runs = [(recipe, s) for recipe in ("mdgf-exp", "srste") for s in seeds] + [("dense", seed)]
    ppl: dict[str, list[float]] = {}
    curves: dict[str, tuple[list[int], list[float]]] = {}
    tokenizer_model = str(model_folder(ctx, "", smoke))  # every run uses the base model's tokenizer
    loop = sweep(ctx, runs, label=lambda item: f"{item[0]} seed {item[1]}")
    for recipe, s in loop:
        inner = InMemoryRunContext(seed=s, resources=ctx.resources)
        params = PGFParams(recipe=recipe, checkpoint_every=0, tokenizer_model=tokenizer_model, **budget)
        ppl.setdefault(recipe, []).append(train_nm(inner, params, smoke)[1]["val_ppl"])
        if s == seed:
            curves[recipe] = tuple(zip(*inner.history("train_loss")))  # type: ignore[assignment]
    ctx.save_artifact("nm_pgf_training.png", curves_figure({"train loss": curves}, "step"), kind="plot")
    ours, base = statistics.fmean(ppl["mdgf-exp"]), statistics.fmean(ppl["srste"])
    note = (
        f"MDGF-Exp {ours:.2f} vs SR-STE {base:.2f}, mean of {len(seeds)} seed(s); dense {ppl['dense'][0]:.2f}; "
        f"{budget['steps']} steps from scratch ({sum(loop.seconds.values()):.0f}s)"
    )
    return Outcome(ours=ppl["mdgf-exp"], baseline=ppl["srste"], note=note, details={"ppl": ppl})
