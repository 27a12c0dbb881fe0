"""EoRA: training-free eigenspace low-rank compensation of a compressed LLM.

Paper: Shih-Yang Liu, Maksim Khadkevich, Nai Chit Fung, Charbel Sakr, Chao-Han Huck Yang, Chien-Yi Wang,
Saurav Muralidharan, Hongxu Yin, Kwang-Ting Cheng, Jan Kautz, Yu-Chiang Frank Wang, Pavlo Molchanov and
Min-Hung Chen, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv:2410.21271 (2024). Reference code: https://github.com/NVlabs/EoRA
(`EoRA/eora.py: llama_sequential_eigen`, and `llama_sequential_svd` for the SVD baseline); the same
method is in GPTQModel (`gptqmodel/eora/eora.py: eora_compute_lora`).

A compressed linear Ŵ (quantized or pruned) errs by ΔW = W − Ŵ. Plain SVD compensation adds the best
rank-r approximation of ΔW itself, which minimises ‖ΔW − BA‖_F and ignores which input directions the
layer actually sees. EoRA minimises the error on the calibration activations instead,
‖(ΔW − BA)X‖_F (the paper's Eq. 4), by working in the eigenspace of the input covariance:

    C = E[x xᵀ] = Q Λ Qᵀ                          (eigendecomposition; λ ≤ 0 → smallest positive λ)
    ΔW Q Λ^½ = U Σ Vᵀ                              (SVD of the error projected and scaled, Eq. 5)
    B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ Λ^−½ Qᵀ        (Eq. 6)

Since ‖(ΔW − BA)X‖²_F = T·‖(ΔW − BA) Q Λ^½‖²_F, Eckart–Young makes this the optimum at every rank,
so EoRA's activation-weighted error never exceeds SVD's; at full rank BA = ΔW and Ŵ + BA = W; with
C ∝ I it is plain SVD. These are the unit tests. Eigenvalues that are not positive (too little
calibration data, dead features) are raised to the smallest positive one, as the reference does
(with a relative floor of 1e-12 of the largest, ours, so float noise counts as zero).

Blocks are compensated in order, as the reference's `llama_sequential_eigen` does: the covariances C of
block l's linears are gathered by running block l with its dense weights W on the outputs of blocks < l
as already compensated (Ŵ + BA); then block l's weights become Ŵ + BA and its compensated outputs feed
block l + 1. So each linear's C is taken on the activations its dense weight W would see, while the error
the earlier blocks leave after compensation is carried forward (a test checks this order on a two-block
model). The result is merged into a standard HF folder (Ŵ + BA, what the deployment serves) and the factors
are also saved as a peft LoRA adapter over the compressed model (`lora_A` = A, `lora_B` = B, scaling 1) in
`eora-adapter/`, the key names the reference saves, so a sparse or quantized base can keep its format and
add the adapter. The adapter's base is the compressed model Ŵ, never the merged one (which has BA already): a
job that compresses here registers Ŵ too (`<parent>-rtn3`, `<parent>-wanda-2of4`, …) and the adapter names
that registered version as `base_model_name_or_path`; with `compressed_model` it names that one. A test
applies the adapter with peft to that registered base and gets the merged model's logits. The block walk is
the one every decoder stack transformers exposes has (`decoder_stack`): Llama, Qwen2, GPT-NeoX, and GPT-2,
whose `Conv1D` linears are read as [out, in] (`weight_matrix`); nothing in Eq. 4–6 depends on the layout.

Defaults: rank 16 and 32 calibration windows of 256 tokens, sized for the 1.3M-parameter base model (the
paper uses r = 128 and 256 calibration samples for LLaMA3-8B); compression, when no compressed model is
given, is 3-bit RTN per row or Wanda/SparseGPT/magnitude pruning (2:4 by default) of the shared toolkit.
The reproduction compresses the cached base with 3-bit RTN and, separately, Wanda 2:4, and compares EoRA
with SVD at r ∈ {4, 8, 16} on 32×256 calibration tokens. EoRA is deterministic, so its seeds differ only
in their calibration data: the i-th seed calibrates on the i-th disjoint slice of windows from the start
of the train split (the first seed on the first windows).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from models.context import RunContext, stop_if_cancelled
from models.llm.base import base_model_name
from models.llm.compression.calibration import block_input_stats, block_linears, weight_matrix
from models.llm.compression.job import (
    CompressionParams,
    load_parent,
    model_stem,
    parent_model_field,
    register_compressed,
    token_sets,
)
from models.llm.compression.oneshot import linear_name, prune_model, quantize_model
from models.llm.compression.pruning import SPARSITY_PATTERN, SparsityPattern
from models.llm.evaluation import perplexity
from models.llm.folder import CausalLM, decoder_stack, load_folder
from models.model_params import model_field
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

Compensation = Literal["eora", "svd"]
Compression = Literal["rtn", "wanda", "sparsegpt", "magnitude"]


def eigen_scaling(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q Λ^½, Λ^−½ Qᵀ) of C = QΛQᵀ; non-positive eigenvalues are raised to the smallest positive one
    (gptqmodel's rule; they come from too little calibration data or dead features)."""
    eigenvalues, q = torch.linalg.eigh(covariance.to(torch.float64))
    floor = eigenvalues.max().clamp_min(1e-30) * 1e-12
    positive = eigenvalues[eigenvalues > floor]
    smallest = positive.min() if len(positive) else torch.tensor(1.0, dtype=torch.float64)
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, smallest)
    root = eigenvalues.sqrt()
    return q * root[None, :], (q / root[None, :]).T


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD compensation: the best rank-r approximation of ΔW in Frobenius norm, split √Σ each side."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def eora_factors(delta: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA (Eq. 5–6): B [out, r] and A [r, in] minimising ‖(ΔW − BA)X‖_F for inputs with E[xxᵀ] = C."""
    scale, inverse = eigen_scaling(covariance)
    b, a_scaled = svd_factors(delta.to(torch.float64) @ scale, rank)
    return b, a_scaled @ inverse


def activation_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, covariance: torch.Tensor) -> float:
    """E‖(ΔW − BA)x‖² = tr(R C Rᵀ), R = ΔW − BA."""
    residual = delta.to(torch.float64) - b @ a
    return float(torch.einsum("ij,jk,ik->", residual, covariance.to(torch.float64), residual))


@dataclass
class Compensated:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # full linear name → (B, A)
    extra_parameters: int


@torch.no_grad()
def compensate(
    compressed: nn.Module,
    dense: nn.Module,
    windows: torch.Tensor,
    rank: int,
    kind: Compensation,
    batch_size: int = 8,
    on_block: Callable[[int, int], None] | None = None,
) -> Compensated:
    """Add rank-r compensation to every block linear of `compressed` in place (merged: Ŵ + BA), block by block
    in the reference's order (`llama_sequential_eigen`): block l's input covariances are gathered through block
    l with its dense weights W, fed by the outputs of blocks < l already compensated; then its weights become
    Ŵ + BA, so its compensated outputs feed block l + 1. SVD needs no statistics. `on_block(done, total)` after
    each block."""
    modules = dict(dense.named_modules())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stack, layers = decoder_stack(compressed)
    for layer, block in enumerate(layers):
        linears = block_linears(block)
        lowered = {name: weight_matrix(linear).detach().clone() for name, linear in linears.items()}  # Ŵ
        dense_weights = {name: weight_matrix(modules[linear_name(layer, name, stack)]) for name in linears}  # W
        stats = None
        if kind == "eora":
            for name, linear in linears.items():
                weight_matrix(linear).copy_(dense_weights[name])
            stats = block_input_stats(compressed, windows, layer, batch_size)
        for name, linear in linears.items():
            full = linear_name(layer, name, stack)
            delta = dense_weights[name].to(torch.float64) - lowered[name].to(torch.float64)
            r = min(rank, *delta.shape)
            b, a = eora_factors(delta, stats[name].covariance, r) if stats is not None else svd_factors(delta, r)
            weight_matrix(linear).copy_(lowered[name] + (b @ a).to(lowered[name].dtype))
            factors[full] = (b.float(), a.float())
        if on_block:
            on_block(layer + 1, len(layers))
    extra = sum(b.numel() + a.numel() for b, a in factors.values())
    return Compensated(factors, extra)


def peft_adapter(
    compressed: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, base: str = ""
) -> nn.Module:
    """A peft LoRA model over a copy of the compressed model with lora_A = A, lora_B = B and scaling 1.

    `base` is what its `adapter_config.json` names as `base_model_name_or_path`: the compressed model (a registered
    ref), since the adapter adds BA to Ŵ; peft would otherwise write the path the copied model was loaded from,
    the dense parent's, and the adapter applied there (or to the merged weights) would be wrong."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    modules = dict(compressed.named_modules())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(factors),
        init_lora_weights=False,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(modules[name], Conv1D) for name in factors),  # GPT-2 stores W as [in, out]
    )
    model = get_peft_model(copy.deepcopy(compressed), config)
    if base:
        model.peft_config["default"].base_model_name_or_path = base
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (b, a) in factors.items():
            layer = modules[name]
            r = b.shape[1]
            layer.lora_A["default"].weight.zero_()[:r].copy_(a)
            layer.lora_B["default"].weight.zero_()[:, :r].copy_(b)
    return model


class EoRAParams(CompressionParams):
    model: str = parent_model_field("decoder-stack")
    compressed_model: str = model_field(
        "a compressed version of `model` to compensate (registered ref or folder); empty: compress `model` here "
        "with `compression`",
        "causal-lm",
        "decoder-stack",
    )
    compression: Compression = Field("rtn", description="how to compress when no compressed_model is given")
    bits: int = Field(3, ge=2, le=8, description="RTN bits (compression='rtn')")
    group_size: int = Field(0, ge=0, le=4096, description="RTN group size (0: one scale per row)")
    sparsity: str = Field("2:4", pattern=SPARSITY_PATTERN, description="pruning pattern: a fraction like 0.5, or N:M")
    rank: int = Field(16, ge=1, le=4096, description="rank r of the compensation B·A of every linear")
    compensation: Compensation = Field("eora", description="eora (eigenspace, the paper) or svd (the baseline)")


def compress_copy(dense: nn.Module, params: EoRAParams, calibration: torch.Tensor) -> nn.Module:
    """A compressed deep copy of `dense` by the params' rule."""
    model = copy.deepcopy(dense)
    if params.compression == "rtn":
        quantize_model(model, params.bits, params.group_size)
    else:
        prune_model(model, calibration, SparsityPattern.parse(params.sparsity), params.compression)
    return model


def compression_slug(params: EoRAParams) -> str:
    """The compression as a registry-name part: `rtn3`, `rtn4-g128`, `wanda-2of4`, `magnitude-0.5`."""
    if params.compression == "rtn":
        return f"rtn{params.bits}" + (f"-g{params.group_size}" if params.group_size else "")
    return f"{params.compression}-{params.sparsity.replace(':', 'of')}"


def pinned_ref(ref: str, folder: Path) -> str:
    """`ref` with the version it resolved to (`name` → `name@3`), so the adapter's base stays that version when
    a later one is registered; a folder's path (an import root) is kept as given."""
    if Path(ref).is_absolute() or "@" in ref and ref.rpartition("@")[2].isdigit():
        return ref
    return f"{ref.partition('@')[0]}@{folder.name}" if folder.name.isdigit() else ref


def compression_label(params: EoRAParams) -> str:
    return f"rtn {params.bits}-bit" if params.compression == "rtn" else f"{params.compression} {params.sparsity}"


@method(
    "eora",
    family="llm-compression",
    task="compress",
    datasets=("text-corpus",),
    params=EoRAParams,
    paper="EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation",
    tiny={"model": base_model_name(smoke=True), "calibration_windows": 2, "seq_len": 32, "eval_windows": 2, "rank": 4},
)
def run(ctx: RunContext, params: EoRAParams) -> None:
    """Compensate a quantized or pruned LLM with eigenspace low-rank factors (or plain SVD); register it."""
    parent = load_parent(ctx, params.model)
    sets = token_sets(ctx, parent.lm, params)
    ctx.progress(0, 3, "compressing")
    if params.compressed_model:
        compressed_folder = ctx.load_model(params.compressed_model)
        compressed = load_folder(compressed_folder).model
    else:
        compressed = compress_copy(parent.lm.model, params, sets.calibration)
    stop_if_cancelled(ctx)
    ppl_dense = perplexity(parent.lm.model, sets.evaluation)
    ppl_compressed = perplexity(compressed, sets.evaluation)
    stem = model_stem(parent.ref)
    if params.compressed_model:
        adapter_base = pinned_ref(params.compressed_model, compressed_folder)
    else:  # the adapter's base is the compressed model: registered too, so the adapter has a base to name
        adapter_base = register_compressed(
            ctx,
            CausalLM(compressed, parent.lm.tokenizer, parent.lm.path),
            parent.ref,
            "eora",
            params,
            {"val_ppl": ppl_compressed, "val_ppl_parent": ppl_dense},
            f"{stem}-{compression_slug(params)}",
            {"compressed_from": compression_label(params), "stage": "compressed: the base of the EoRA adapter"},
        )
    ctx.progress(1, 3, f"compensating at rank {params.rank}")
    base_for_adapter = copy.deepcopy(compressed)
    result = compensate(
        compressed,
        parent.lm.model,
        sets.calibration,
        params.rank,
        params.compensation,
        on_block=lambda _done, _total: stop_if_cancelled(ctx),
    )
    ppl = perplexity(compressed, sets.evaluation)
    metrics = {
        "val_ppl": ppl,
        "val_ppl_compressed": ppl_compressed,
        "val_ppl_parent": ppl_dense,
        "extra_parameters": result.extra_parameters,
    }
    ctx.log(0, **metrics)
    lm = CausalLM(compressed, parent.lm.tokenizer, parent.lm.path)
    extra = {"compressed_from": params.compressed_model or compression_label(params), "adapter_base": adapter_base}
    name = params.output_name or f"{stem}-{params.compensation}-r{params.rank}"
    ref = register_compressed(
        ctx,
        lm,
        parent.ref,
        "eora",
        params,
        metrics,
        name,
        extra,
        subfolders={
            "eora-adapter": lambda folder: peft_adapter(
                base_for_adapter, result.factors, params.rank, adapter_base
            ).save_pretrained(str(folder))
        },
    )
    ctx.progress(3, 3, f"registered {ref}: val ppl {ppl_compressed:.2f} → {ppl:.2f} (parent {ppl_dense:.2f})")


# -- reproduction -------------------------------------------------------------------------------

KINDS: tuple[Compensation, ...] = ("svd", "eora")


def eora_row(
    dense: nn.Module, setting: EoRAParams, calibration: torch.Tensor, evaluation: torch.Tensor, ranks: tuple[int, ...]
) -> dict[str, float]:
    """ppl of the compressed model and of its SVD and EoRA compensations at each rank, for one compression."""
    compressed = compress_copy(dense, setting, calibration)
    row = {"compressed": perplexity(compressed, evaluation)}
    for rank in ranks:
        for kind in KINDS:
            model = copy.deepcopy(compressed)
            compensate(model, dense, calibration, rank, kind)
            row[f"{kind} r={rank}"] = perplexity(model, evaluation)
    return row


@reproduction(
    "eora",
    claim="EoRA beats plain SVD compensation at equal rank: ppl(EoRA) < ppl(SVD) < ppl(compressed) "
    "for every rank and both 3-bit RTN and Wanda 2:4",
    metric="val perplexity (mean over ranks and compressions)",
    direction="lower",
    baseline="SVD compensation",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """3-bit RTN and Wanda 2:4 of the cached tiny base, each compensated by SVD and by EoRA at r ∈ {4, 8, 16} from
    32×256 calibration tokens; per seed, a disjoint calibration slice (EoRA itself is deterministic)."""
    params = EoRAParams(
        calibration_windows=4 if smoke else 32, seq_len=32 if smoke else 256, eval_windows=4 if smoke else 32
    )
    parent = load_parent(ctx, "", smoke)
    evaluation = token_sets(ctx, parent.lm, params).evaluation
    ranks = (4,) if smoke else (4, 8, 16)
    settings = {
        compression_label(setting): setting
        for setting in (
            params.model_copy(update={"compression": "rtn", "bits": 3}),
            params.model_copy(update={"compression": "wanda", "sparsity": "2:4"}),
        )
    }
    seeds = seeds_for(seed, smoke)
    runs = [(i, label) for i in range(len(seeds)) for label in settings]
    per_seed: list[dict[str, dict[str, float]]] = [{} for _ in seeds]
    loop = sweep(ctx, runs, label=lambda item: f"seed {seeds[item[0]]}: {item[1]}")
    calibration: dict[int, torch.Tensor] = {}
    for i, label in loop:
        if i not in calibration:
            calibration[i] = token_sets(ctx, parent.lm, params, calibration_block=i).calibration
        per_seed[i][label] = eora_row(parent.lm.model, settings[label], calibration[i], evaluation, ranks)
    cells = [f"{kind} r={r}" for r in ranks for kind in KINDS] + ["compressed"]
    table = {label: {k: statistics.fmean(t[label][k] for t in per_seed) for k in cells} for label in settings}
    dense = perplexity(parent.lm.model, evaluation)
    ordered = {
        f"{label} r={r}": row[f"eora r={r}"] < row[f"svd r={r}"] < row["compressed"]
        for label, row in table.items()
        for r in ranks
    }

    def mean_over_grid(t: dict[str, dict[str, float]], kind: Compensation) -> float:
        return statistics.fmean(t[label][f"{kind} r={r}"] for label in settings for r in ranks)

    panels = {
        f"val ppl, {label}": {kind: (list(ranks), [row[f"{kind} r={r}"] for r in ranks]) for kind in KINDS}
        | {"compressed": (list(ranks), [row["compressed"]] * len(ranks))}
        for label, row in table.items()
    }
    ctx.save_artifact("eora_vs_svd.png", curves_figure(panels, "rank r", ncols=2), kind="plot")
    note = (
        f"ordering EoRA < SVD < compressed (means over seeds) holds in {sum(ordered.values())}/{len(ordered)} "
        f"settings; dense ppl {dense:.2f}; training-free and deterministic, so each of the {len(seeds)} seed(s) "
        f"calibrates on its own disjoint slice of {params.calibration_windows}×{params.seq_len} train tokens "
        f"({sum(loop.seconds.values()):.0f}s)"
    )
    return Outcome(
        ours=[mean_over_grid(t, "eora") for t in per_seed],
        baseline=[mean_over_grid(t, "svd") for t in per_seed],
        holds=all(ordered.values()),
        note=note,
        details={"ppl": {"dense": {"ppl": dense}} | table, "ppl_per_seed": per_seed, "ordered": ordered},
    )
