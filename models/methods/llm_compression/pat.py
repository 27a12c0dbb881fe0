"""PAT: pruning-aware tuning, which learns which hidden channels to remove while it tunes.

Paper: Yijiang Liu, Huanrui Yang, Youxin Chen, Rongyu Zhang, Miao Wang, Yuan Du and Li Du, "PAT:
Pruning-Aware Tuning for Large Language Models", AAAI 2025, arXiv:2408.14721. Reference code:
https://github.com/kriskrisliu/PAT_Pruning-Aware-Tuning (`DimDownModule.py`, the patched
`modeling_llama.py` of transformers 4.40.1, `script/merge_dimdown.py`).

Instead of tuning a model and pruning it afterwards, PAT prunes hidden (residual-stream) channels during
tuning. Hybrid Sparsification Modules (HSMs) sit after the embedding and after every attention and MLP
output — the only writers to the residual stream:

    y = s ⊙ m ⊙ (x + W_u W_d x),   W_d ∈ ℝ^{r×D} (Kaiming), W_u = 0, s = 1 at init,

and all HSMs share one mask-logit vector M ∈ ℝ^D (init 0) through

    m = σ(τM) + β,   τ = 1/(1 − ln max(1, t)/ln T_g),   β = max(0, ½ − t/T_g),

so with M = 0 at t = 0, m = σ(0) + ½ = 1 (the model is unchanged at initialisation) and m → 1[M ≥ 0] as
t → T_g; M is frozen after 0.8·T_g. The loss adds to CE the width loss 10·|Σ1[M≥0] − D'|/D' (its count
through a straight-through estimator), the polarisation terms mean((M−½)²) over M > 0 and mean((M+½)²)
over M ≤ 0, and the paper's Identity Loss MSE(W_d W_dᵀ, I) of every HSM. LoRA (peft) tunes the base
weights alongside. Checked against the reference `DimDownModule.py` (same schedule, STE, losses and init;
its `dimdown_scale` is our s).

Merging: with the binary mask every pruned channel of the residual stream is exactly zero, so
T = diag(s⊙m)(I + W_u W_d) folds into the embedding rows, o_proj and down_proj, and the zero channels
are sliced away from every matrix — a standard, genuinely smaller `LlamaForCausalLM` (hidden_size D',
head_dim kept; input and output embeddings untied when a map is folded into the input side). RMSNorm
divides by the root-mean-square over D channels; after slicing it averages over D', so its gains are
multiplied by √(D/D') (and its ε by D/D') for the sliced model to equal the masked one exactly (a test).

Baseline ("prune after tuning"): the same LoRA tuning without HSMs, then the D' channels of highest
calibration activation energy kept and sliced the same way. The paper prunes its baseline with
torch-pruning, which is not installed here; the slicing is identical, only the channel choice differs.

Defaults, rescaled for the 1.3M-parameter base model (D = 128): HSM rank r = 32 (the paper's 200 exceeds
D), LoRA r = 8 with α = 2r (the paper: r = 20, α = 4), lr 1e-3 (the paper: 5e-5), D' = 96 (the paper's
3072/4096 ratio for Llama2-7B) and T_g = 300 steps of 4 windows, on the stdlib-code language-modelling
task rather than the paper's LaMini instruction data. The reproduction tunes both recipes per seed (the
seed draws the HSM and LoRA initialisation and the batches) and checks the paper's other two claims on
the means over seeds: PAT within 5% of the dense perplexity, and at least 1.1× the dense prefill
throughput.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.llm.base import base_model_name
from models.llm.compression.job import (
    CompressionTuningParams,
    load_parent,
    model_stem,
    register_compressed,
    token_sets,
)
from models.llm.data import random_windows, sampled_stream
from models.llm.evaluation import perplexity
from models.llm.folder import CausalLM, decoder_layers
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Binarize(torch.autograd.Function):
    """1[M ≥ 0] forward, identity gradient (the reference's straight-through estimator)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (logits >= 0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


class SharedMask(nn.Module):
    """The mask logits M shared by every HSM and the schedule that anneals σ(τM) + β to 1[M ≥ 0]."""

    def __init__(self, hidden: int, total_steps: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(hidden))
        self.total_steps = total_steps
        self.step = 0
        self.binary = False
        self.width: int | None = None  # the final width, fixed when the mask turns binary

    def temperature_and_bias(self, step: int) -> tuple[float, float]:
        frozen = int(0.8 * self.total_steps)
        t = min(step, frozen)
        tau = 1.0 / (1.0 - math.log(max(1, t)) / math.log(self.total_steps) + 1e-6)
        return tau, max(0.0, 0.5 - step / self.total_steps)

    def values(self) -> torch.Tensor:
        if self.binary:
            return torch.zeros_like(self.logits).index_fill_(0, self.kept(self.width), 1.0).detach()
        tau, bias = self.temperature_and_bias(self.step)
        logits = self.logits if self.step < int(0.8 * self.total_steps) else self.logits.detach()
        return torch.sigmoid(tau * logits) + bias

    def kept(self, width: int | None = None) -> torch.Tensor:
        """Channels with M ≥ 0, or, when `width` is given and training did not land on exactly that many
        (a short run can overshoot), the `width` channels of largest M — sorted either way."""
        m = self.logits.detach()
        chosen = torch.nonzero(m >= 0).squeeze(1)
        if width is not None and len(chosen) != width:
            chosen = m.topk(width).indices
        return chosen.sort().values

    def loss(self, target: int) -> torch.Tensor:
        """10·|Σ1[M≥0] − D'|/D' (STE) + polarisation of M away from 0."""
        m = self.logits
        count = _Binarize.apply(m).sum()
        loss = 10.0 * (count - target).abs() / target
        if (m > 0).any():
            loss = loss + ((m[m > 0] - 0.5) ** 2).mean()
        if (m <= 0).any():
            loss = loss + ((m[m <= 0] + 0.5) ** 2).mean()
        return loss


class HSM(nn.Module):
    """One hybrid sparsification module: s ⊙ m ⊙ (x + W_u W_d x)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (x + self.up(self.down(x))) * mask * self.scale

    def transform(self, mask: torch.Tensor) -> torch.Tensor:
        """T = diag(s⊙m)(I + W_u W_d), the D×D map the module applies."""
        eye = torch.eye(self.scale.shape[0], dtype=self.scale.dtype)
        return (self.scale * mask)[:, None] * (eye + self.up.weight @ self.down.weight)

    def identity_loss(self) -> torch.Tensor:
        w = self.down.weight
        return ((w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)) ** 2).mean()


class PATModules(nn.Module):
    """The shared mask and the HSMs of one model, attached by forward hooks (embedding, attention, MLP)."""

    def __init__(self, model: nn.Module, rank: int, total_steps: int):
        super().__init__()
        hidden = model.config.hidden_size
        self.mask = SharedMask(hidden, total_steps)
        layers = decoder_layers(model)
        self.sites = nn.ModuleDict({"embed": HSM(hidden, rank)})
        targets = {"embed": model.model.embed_tokens}
        for i, layer in enumerate(layers):
            for part, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):
                self.sites[f"{part}{i}"] = HSM(hidden, rank)
                targets[f"{part}{i}"] = module
        self.handles = [module.register_forward_hook(self._hook(site)) for site, module in targets.items()]

    def _hook(self, site: str):
        def apply(_module: nn.Module, _args: object, output: object) -> object:
            hsm = self.sites[site]
            if isinstance(output, tuple):  # attention returns (output, weights)
                return (hsm(output[0], self.mask.values()), *output[1:])
            return hsm(output, self.mask.values())

        return apply

    def regulariser(self, target: int) -> torch.Tensor:
        return self.mask.loss(target) + sum(h.identity_loss() for h in self.sites.values())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def slice_hidden(
    model: LlamaForCausalLM, kept: torch.Tensor, transforms: dict[str, torch.Tensor] | None = None
) -> LlamaForCausalLM:
    """A Llama with hidden size |kept|: optional D×D maps folded into the residual writers (embedding rows,
    o_proj, down_proj), every matrix sliced to the kept channels, RMSNorm gains × √(D/D') and ε × D/D'
    (√(Σx²/D' + ε D/D') = √(D/D')·√(Σx²/D + ε), so the narrow model computes exactly what the masked one does)."""
    config = model.config
    d, d_new = config.hidden_size, len(kept)
    transforms = transforms or {}
    # A tied input/output embedding stays tied unless a map is folded into the embedding (then the two differ);
    # untying it anyway would store the vocabulary matrix twice and make the narrowed model bigger than the base.
    tied = model.lm_head.weight is model.model.embed_tokens.weight and "embed" not in transforms
    new_config = LlamaConfig(
        **{
            **config.to_dict(),
            "hidden_size": d_new,
            "head_dim": config.hidden_size // config.num_attention_heads,
            "tie_word_embeddings": tied,
            "rms_norm_eps": config.rms_norm_eps * d / d_new,
        }
    )
    new_config.architectures = ["LlamaForCausalLM"]
    small = LlamaForCausalLM(new_config).to(model.dtype)
    gain = math.sqrt(d / d_new)

    def fold(site: str, weight: torch.Tensor) -> torch.Tensor:  # weight writes [D, ·] into the residual stream
        return transforms[site] @ weight if site in transforms else weight

    embed = model.model.embed_tokens.weight
    small.model.embed_tokens.weight.copy_(fold("embed", embed.T).T[:, kept])
    if not tied:
        small.lm_head.weight.copy_(model.lm_head.weight[:, kept])
    small.model.norm.weight.copy_(model.model.norm.weight[kept] * gain)
    for i, (old, new) in enumerate(zip(model.model.layers, small.model.layers)):
        new.input_layernorm.weight.copy_(old.input_layernorm.weight[kept] * gain)
        new.post_attention_layernorm.weight.copy_(old.post_attention_layernorm.weight[kept] * gain)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(new.self_attn, name).weight.copy_(getattr(old.self_attn, name).weight[:, kept])
        new.self_attn.o_proj.weight.copy_(fold(f"attn{i}", old.self_attn.o_proj.weight)[kept])
        new.mlp.gate_proj.weight.copy_(old.mlp.gate_proj.weight[:, kept])
        new.mlp.up_proj.weight.copy_(old.mlp.up_proj.weight[:, kept])
        new.mlp.down_proj.weight.copy_(fold(f"mlp{i}", old.mlp.down_proj.weight)[kept])
    return small.eval()


class PATParams(CompressionTuningParams):
    hidden_size: int = Field(96, ge=1, description="target width D' of the residual stream")
    baseline: bool = Field(
        False, description="LoRA tuning then activation-energy channel pruning (the baseline) instead of PAT"
    )
    steps: int = Field(300, ge=2, le=100_000, description="tuning steps T_g")
    batch_size: int = Field(4, ge=1, le=512, description="windows per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate of LoRA, HSMs and mask logits")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank of the base linears")
    hsm_rank: int = Field(32, ge=1, le=4096, description="rank r of each HSM's W_u W_d")
    train_tokens: int = Field(200_000, ge=1000, description="tuning tokens sampled from the train split's documents")


@dataclass
class Tuned:
    model: LlamaForCausalLM
    kept: torch.Tensor
    history: list[float]


def tune(ctx: RunContext, lm: CausalLM, params: PATParams, calibration: torch.Tensor) -> Tuned:
    """LoRA tuning with (PAT) or without (baseline) HSMs; the merged, sliced model and the kept channels."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(lm.model)
    hidden = base.config.hidden_size
    if not 0 < params.hidden_size < hidden:
        raise ValueError(f"hidden_size must be between 1 and the model's {hidden - 1}")
    torch.manual_seed(ctx.seed)
    pat = PATModules(base, params.hsm_rank, params.steps) if not params.baseline else None
    model = get_peft_model(
        base,
        LoraConfig(
            r=params.lora_rank,
            lora_alpha=2 * params.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad] + (list(pat.parameters()) if pat else [])
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    stream = sampled_stream(lm.tokenizer, ds.train["text"], params.train_tokens)
    generator = torch.Generator().manual_seed(ctx.seed)
    history = []
    model.train()
    for step in range(params.steps):
        stop_if_cancelled(ctx)
        ids = random_windows(stream, params.batch_size, calibration.shape[1], generator)
        if pat is not None:
            pat.mask.step = step
        loss = model(input_ids=ids, labels=ids).loss
        total = loss + (pat.regulariser(params.hidden_size) if pat is not None else 0.0)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append(loss.item())
        ctx.log(step + 1, train_ce=loss.item(), **({"kept_channels": len(pat.mask.kept())} if pat else {}))
        ctx.progress(step + 1, params.steps, f"step {step + 1}: ce {loss.item():.3f}")
    merged = model.merge_and_unload().eval()
    if pat is None:
        return Tuned(
            slice_hidden(merged, channel_energy(merged, calibration).topk(params.hidden_size).indices.sort().values),
            torch.tensor([]),
            history,
        )
    ctx.log(params.steps, mask_channels_at_end=len(pat.mask.kept()))
    pat.mask.binary, pat.mask.width = True, params.hidden_size
    kept = pat.mask.kept(params.hidden_size)
    with torch.no_grad():
        transforms = {site: hsm.transform(pat.mask.values()) for site, hsm in pat.sites.items()}
    pat.remove()
    return Tuned(slice_hidden(merged, kept, transforms), kept, history)


@torch.no_grad()
def channel_energy(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean squared activation of each residual-stream channel over all layers and calibration tokens."""
    hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    return torch.stack([h.pow(2).mean(dim=(0, 1)) for h in hidden]).mean(0)


def tokens_per_second(model: nn.Module, windows: torch.Tensor, repeats: int = 5) -> float:
    """Forward (prefill) throughput, the best of `repeats` timings — robust to a busy shared CPU."""
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=windows)
            best = min(best, time.perf_counter() - start)
    return windows.numel() / best


@method(
    "pat",
    family="llm-compression",
    task="compress",
    datasets=("text-corpus",),
    params=PATParams,
    paper="PAT: Pruning-Aware Tuning for Large Language Models",
    tiny={
        "model": base_model_name(smoke=True),
        "hidden_size": 48,
        "steps": 3,
        "batch_size": 2,
        "calibration_windows": 2,
        "seq_len": 16,
        "eval_windows": 2,
        "train_tokens": 2000,
    },
)
def run(ctx: RunContext, params: PATParams) -> None:
    """Tune with LoRA while hybrid sparsification modules learn which hidden channels to drop; register the
    merged, genuinely narrower Llama."""
    parent = load_parent(ctx, params.model)
    sets = token_sets(ctx, parent.lm, params)
    tuned = tune(ctx, parent.lm, params, sets.calibration)
    metrics = {
        "val_ppl": perplexity(tuned.model, sets.evaluation),
        "val_ppl_parent": perplexity(parent.lm.model, sets.evaluation),
        "hidden_size": tuned.model.config.hidden_size,
        "parameters": sum(p.numel() for p in tuned.model.parameters()),
    }
    ctx.log(params.steps, **metrics)
    kind = "lora-prune" if params.baseline else "pat"
    name = params.output_name or f"{model_stem(parent.ref)}-{kind}-d{tuned.model.config.hidden_size}"
    ref = register_compressed(
        ctx,
        CausalLM(tuned.model, parent.lm.tokenizer, parent.lm.path),
        parent.ref,
        "pat",
        params,
        metrics,
        name,
        {"kept_channels": tuned.kept.tolist()},
    )
    ctx.progress(params.steps, params.steps, f"registered {ref}: val ppl {metrics['val_ppl']:.2f}")


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "pat",
    claim="pruning during tuning beats pruning after tuning: at D'=96/128, PAT's merged model has "
    "lower val ppl than LoRA-then-prune, within 5% of dense, and ≥1.1× the dense throughput",
    metric="val perplexity of the narrowed model",
    direction="lower",
    baseline="LoRA then channel pruning",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per seed, both recipes tune the cached base for the same steps on the same data, then are narrowed to D'
    channels; the prefill speed-up of PAT's narrow model over the dense one is timed per seed."""
    budget = (
        {
            "calibration_windows": 2,
            "seq_len": 32,
            "eval_windows": 2,
            "steps": 4,
            "batch_size": 2,
            "train_tokens": 2000,
            "hidden_size": 48,
        }
        if smoke
        else {
            "calibration_windows": 8,
            "seq_len": 128,
            "eval_windows": 32,
            "steps": 300,
            "batch_size": 4,
            "train_tokens": 200_000,
            "hidden_size": 96,
        }
    )
    parent = load_parent(ctx, "", smoke)
    params = PATParams(**budget)
    sets = token_sets(ctx, parent.lm, params)
    dense_ppl = perplexity(parent.lm.model, sets.evaluation)
    seeds = seeds_for(seed, smoke)
    ppl: dict[str, list[float]] = {"pat": [], "lora-prune": []}
    speedup: list[float] = []
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        models = {}
        for baseline in (False, True):
            inner = InMemoryRunContext(dataset=ctx.dataset, seed=s, resources=ctx.resources)
            tuned = tune(inner, parent.lm, params.model_copy(update={"baseline": baseline}), sets.calibration)
            models["lora-prune" if baseline else "pat"] = tuned.model
        for kind, model in models.items():
            ppl[kind].append(perplexity(model, sets.evaluation))
        window = sets.evaluation[:4]
        speedup.append(tokens_per_second(models["pat"], window) / tokens_per_second(parent.lm.model, window))
    mean_pat, mean_speedup = statistics.fmean(ppl["pat"]), statistics.fmean(speedup)
    checks = {"within 5% of dense": mean_pat <= 1.05 * dense_ppl, "≥1.1× faster": mean_speedup >= 1.1}
    note = (
        f"PAT {mean_pat:.2f} vs LoRA-then-prune {statistics.fmean(ppl['lora-prune']):.2f} vs dense {dense_ppl:.2f} "
        f"at D'={params.hidden_size}/{parent.lm.model.config.hidden_size}, {params.steps} steps, mean of "
        f"{len(seeds)} seed(s); prefill speed-up {mean_speedup:.2f}×; other checks (means over seeds): "
        f"{', '.join(f'{k}: {v}' for k, v in checks.items())}"
    )
    return Outcome(
        ours=ppl["pat"],
        baseline=ppl["lora-prune"],
        holds=all(checks.values()),
        note=note,
        details={"ppl": ppl | {"dense": dense_ppl}, "speedup": speedup, "checks": checks},
    )
