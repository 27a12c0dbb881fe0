"""MatryoshkaKV as a compression method, and its reproduction.

Paper: Bokai Lin, Zihao Zeng, Zipeng Xiao, Siqi Kou, Tianqi Hou, Xiaofeng Gao, Hao Zhang and Zhijie Deng,
"MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection" (ICLR 2025, arXiv 2410.14731).
Reference code: https://github.com/The-kamisato/MatryoshkaKV-cache (`modeling_pcallama_trial.py`,
`cal_pcallama_init.py`, `train/pt/trainer.py`, `cal_adaptive_rate.py`). The projection, its attention function and
cache are in `models/llm/kv_cache/matryoshka.py`; calibration, training and the rank search in
`models/llm/kv_cache/matryoshka_training.py`.

Mechanism, per layer and KV head, after RoPE, with orthogonal U_K, U_V (d × d) and means μ_K, μ_V:

    k̃ = (k − μ_K)·U_K[:, :r_K],   q̃ = q·U_K[:, :r_K]          (q·μ_K is the same for every key: softmax ignores it)
    ṽ = (v − μ_V)·U_V[:, :r_V],   o = softmax(q̃·k̃ᵀ / √d)·ṽ·U_V[:, :r_V]ᵀ + μ_V

so the cache holds r_K + r_V numbers per token and head instead of 2d, and at r = d the output is the original
one for any orthogonal U and any μ. U is initialised to each head's PCA basis of calibration keys and values and
parametrised by the Cayley map U = P·(I − A/2)⁻¹(I + A/2), A = X − Xᵀ, so it stays orthogonal. Training (only X
and μ; the model is frozen and is its own teacher with exact attention) minimises 0.25·KL(teacher ‖ student) +
0.75·CE, with every head's r_K and r_V drawn anew at each step from {step, 2·step, …, d}: the "Matryoshka"
sampling that puts the most useful directions first, so one trained projection serves every rank. For a KV
budget, a greedy search starts at full rank and repeatedly cuts by `cut` the K or V rank of the head whose cut
least raises the last hidden state's relative error ‖h − h_r‖ / ‖h‖, until Σ(r_K + r_V) fits the budget.

The job fits the projection on the model's train split, searches per-head ranks for each KV budget, measures
held-out perplexity at uniform and searched ranks against the PCA projection, and registers a model folder
carrying `kv_projection.safetensors` and the rank tables, which a deployment serves with
`engine.kv_cache = "matryoshka-kv"`.

Defaults: the paper's are lr 1e-3 under a cosine schedule, ranks in steps of 16 of 128, greedy cuts of 32 and one
epoch of a RedPajama sample at context 2048; ours keep lr 1e-3 and the cosine schedule and scale the rest to the
tiny base (head dimension 32: rank step 4, cut 8; 150 steps of 8 × 256 tokens, 8 calibration windows).
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time

import torch
from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.llm.attention.measure import MODEL_FIELD_DESCRIPTION
from models.llm.base import base_model, base_model_name, model_folder
from models.llm.data import random_windows, sampled_stream, split_windows
from models.llm.evaluation import perplexity
from models.llm.folder import load_folder
from models.llm.kv_cache.matryoshka import KVProjection, projected, save_projection
from models.llm.kv_cache.matryoshka_training import calibrate, greedy_ranks, train_projection
from models.model_params import model_field
from models.params import StepTrainingParams
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep


class MatryoshkaKVParams(StepTrainingParams):
    batch_size: int = Field(8, ge=1, le=1024, description="windows per training step")
    steps: int = Field(150, ge=0, le=100_000, description="training steps (0: PCA only)")
    model: str = model_field(
        MODEL_FIELD_DESCRIPTION,
        "causal-lm",
        "llama",
        builtin=(base_model_name(smoke=True), base_model_name(smoke=False)),
    )
    seq_len: int = Field(256, ge=16, le=1 << 20, description="tokens per training / evaluation window")
    rank_step: int = Field(4, ge=1, le=1024, description="ranks are sampled from {step, 2·step, …, head_dim}")
    cut: int = Field(8, ge=1, le=1024, description="rank removed per greedy step (the paper's 32 of 128)")
    fractions: list[float] = Field(
        [0.5], min_length=1, description="KV budgets (fraction of the dense cache) to search per-head ranks for"
    )
    calibration_windows: int = Field(8, ge=1, le=4096, description="windows for PCA")
    search_windows: int = Field(2, ge=1, le=4096, description="windows for the greedy rank search")
    eval_windows: int = Field(16, ge=1, le=4096)
    train_tokens: int = Field(300_000, ge=1000, le=1 << 30, description="train-split tokens sampled for training")
    model_name: str = Field("matryoshka-kv", min_length=1, max_length=100, description="registered model name")


def uniform_curve(model, projection: KVProjection, windows: torch.Tensor, ranks: list[int]) -> list[float]:
    out = []
    for r in ranks:
        projection.set_ranks(r, r)
        with projected(model, projection):
            out.append(perplexity(model, windows, batch_size=4))
    projection.set_ranks(projection.shape[2], projection.shape[2])
    return out


def training_step(ctx: RunContext, step: int, loss: float) -> None:
    ctx.log(step, train_loss=loss)
    stop_if_cancelled(ctx)


def fit_and_measure(ctx: RunContext, folder, params: MatryoshkaKVParams, seed: int) -> dict:
    """PCA and trained projections, the uniform-rank ppl curves of both, and searched-rank ppl per fraction.
    Progress before each stage, and `Cancelled` there or after any training step when the run was cancelled."""

    def stage(done: int, message: str) -> None:
        ctx.progress(done, 4, message)
        stop_if_cancelled(ctx)

    lm = load_folder(folder)
    model = lm.model
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    stream = sampled_stream(lm.tokenizer, ds.train["text"], params.train_tokens, seed=seed)
    calib = torch.Generator().manual_seed(seed + 1)
    calibration = random_windows(stream, params.calibration_windows, params.seq_len, calib)
    search = random_windows(stream, params.search_windows, params.seq_len, calib)
    windows = split_windows(lm.tokenizer, ds.val["text"], params.seq_len, params.eval_windows)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    ranks = list(range(params.rank_step * 2, head_dim + 1, params.rank_step * 2))
    stage(0, "PCA calibration")
    pca = calibrate(model, calibration)
    dense = perplexity(model, windows, batch_size=4)
    pca_curve = uniform_curve(model, pca, windows, ranks)
    trained = copy.deepcopy(pca)
    stage(1, "training")
    losses = train_projection(
        model,
        trained,
        stream,
        steps=params.steps,
        batch_size=params.batch_size,
        seq_len=params.seq_len,
        lr=params.lr,
        weight_decay=params.weight_decay,
        rank_step=params.rank_step,
        seed=seed,
        on_step=lambda step, loss: training_step(ctx, step, loss),
    )
    trained_curve = uniform_curve(model, trained, windows, ranks)
    stage(2, "rank search")
    searched = {}
    for fraction in params.fractions:
        rank_k, rank_v = greedy_ranks(model, trained, search, fraction, params.cut)
        trained.set_ranks(rank_k, rank_v)
        with projected(model, trained):
            ppl = perplexity(model, windows, batch_size=4)
        searched[fraction] = {"ppl": ppl, "rank_k": rank_k, "rank_v": rank_v, "fraction": trained.kv_fraction()}
        trained.set_ranks(head_dim, head_dim)
    ctx.progress(3, 4, "measured")
    return {
        "dense": dense,
        "ranks": ranks,
        "pca": pca_curve,
        "trained": trained_curve,
        "searched": searched,
        "losses": losses,
        "projection": trained,
        "head_dim": head_dim,
        "lm": lm,
    }


@method(
    "matryoshka-kv",
    family="llm-inference",
    task="compress",
    datasets=("text-corpus",),
    params=MatryoshkaKVParams,
    paper="MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection",
    tiny={
        "model": base_model_name(smoke=True),
        "seq_len": 32,
        "steps": 2,
        "batch_size": 2,
        "calibration_windows": 2,
        "search_windows": 1,
        "eval_windows": 2,
        "train_tokens": 5000,
        "rank_step": 8,
        "cut": 16,
    },
)
def run(ctx: RunContext, params: MatryoshkaKVParams) -> None:
    """Fit, search ranks, measure against PCA, and register a folder a deployment can serve compressed."""
    folder = model_folder(ctx, params.model)
    result = fit_and_measure(ctx, folder, params, ctx.seed or 0)
    fractions = [r / result["head_dim"] for r in result["ranks"]]
    ctx.log(
        params.steps,
        val_ppl_dense=result["dense"],
        **{f"val_ppl_pca_r{r}": p for r, p in zip(result["ranks"], result["pca"])},
        **{f"val_ppl_trained_r{r}": p for r, p in zip(result["ranks"], result["trained"])},
        **{f"val_ppl_searched_{int(f * 100)}pct": s["ppl"] for f, s in result["searched"].items()},
    )
    panels = {
        "val ppl": {
            "PCA": (fractions, result["pca"]),
            "trained (one checkpoint)": (fractions, result["trained"]),
            "dense": (fractions, [result["dense"]] * len(fractions)),
        }
    }
    ctx.save_artifact("matryoshka_kv_ppl.png", curves_figure(panels, "KV fraction (uniform ranks)"), kind="plot")
    out = ctx.workdir / "matryoshka-kv-model"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    tables = {f"{f:g}": (s["rank_k"], s["rank_v"]) for f, s in result["searched"].items()}
    save_projection(out, result["projection"], tables)
    ctx.register_model(
        params.model_name,
        out,
        {
            "method": "matryoshka-kv",
            "parent": str(params.model or "base"),
            "fractions": list(tables),
            "head_dim": result["head_dim"],
        },
    )


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "matryoshka-kv",
    claim="Trained orthogonal projections hold quality where PCA collapses, heterogeneous "
    "(searched) ranks beat uniform ranks, and one checkpoint serves every rank: at "
    "50% KV, trained Δppl ≤ ½ PCA Δppl and searched ≤ uniform",
    metric="held-out ppl at 50% KV (uniform rank 16 of 32)",
    direction="lower",
    baseline="PCA projection at the same ranks",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """The paper's protocol (PCA initialisation, distillation against the frozen model, Matryoshka rank
    sampling, greedy rank search) on the tiny base: head dimension 32, so ranks 8…32 in steps of 4 and greedy cuts
    of 8; 8 calibration windows; per seed 75 steps of 8 × 256 tokens and a rank search on one window (half the
    job's defaults, so that three seeds fit in about ten CPU minutes). Each seed draws its own training sample,
    calibration windows and rank schedule; all seeds are scored on the same 16 held-out windows. The half-Δppl and
    searched-vs-uniform conditions are judged on the means over seeds."""
    start = time.perf_counter()
    params = (
        MatryoshkaKVParams(
            seq_len=32,
            steps=3,
            batch_size=2,
            calibration_windows=2,
            search_windows=1,
            eval_windows=2,
            train_tokens=5000,
            cut=8,
        )
        if smoke
        else MatryoshkaKVParams(steps=75, search_windows=1)
    )
    folder = base_model(ctx, smoke)
    runs = [fit_and_measure(ctx, folder, params, s) for s in sweep(ctx, seeds_for(seed, smoke), lambda s: f"seed {s}")]
    first = runs[0]
    ranks, head_dim = first["ranks"], first["head_dim"]
    half = ranks.index(head_dim // 2) if head_dim // 2 in ranks else len(ranks) // 2
    dense = statistics.fmean(r["dense"] for r in runs)
    pca_curve = [statistics.fmean(r["pca"][i] for r in runs) for i in range(len(ranks))]
    trained_curve = [statistics.fmean(r["trained"][i] for r in runs) for i in range(len(ranks))]
    pca, trained = pca_curve[half], trained_curve[half]
    searched = statistics.fmean(r["searched"][0.5]["ppl"] for r in runs)
    quality_holds = trained - dense <= 0.5 * (pca - dense)
    hetero_holds = searched <= trained
    final_losses = [r["losses"][-1] for r in runs if r["losses"]]
    note = (
        f"means over {len(runs)} seed(s): dense ppl {dense:.2f}; uniform ranks {ranks} of {head_dim}: PCA "
        + ", ".join(f"{p:.2f}" for p in pca_curve)
        + "; trained (one checkpoint) "
        + ", ".join(f"{p:.2f}" for p in trained_curve)
        + f"; at 50%: Δppl trained {trained - dense:+.2f} vs PCA {pca - dense:+.2f} "
        f"({'≤' if quality_holds else '>'} half), searched per-head ranks {searched:.2f} vs uniform {trained:.2f} "
        f"(seed {seeds_for(seed, smoke)[0]}: K ranks {first['searched'][0.5]['rank_k'].tolist()}, "
        f"V ranks {first['searched'][0.5]['rank_v'].tolist()}); "
        f"{params.steps} steps, final loss "
        f"{statistics.fmean(final_losses) if final_losses else float('nan'):.3f}; "
        f"{time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=[r["trained"][half] for r in runs],
        baseline=[r["pca"][half] for r in runs],
        holds=quality_holds and hetero_holds,
        note=note,
        details={
            "dense": dense,
            "ranks": ranks,
            "pca": pca_curve,
            "trained": trained_curve,
            "searched_50": searched,
            "searched_50_by_seed": [r["searched"][0.5]["ppl"] for r in runs],
            "quality_holds": quality_holds,
            "hetero_holds": hetero_holds,
        },
    )
