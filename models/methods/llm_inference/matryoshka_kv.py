"""MatryoshkaKV as a compression method and its reproduction (Lin et al., "MatryoshkaKV: Adaptive KV Compression
via Trainable Orthogonal Projection", ICLR 2025). The projection, its attention function and cache are in
`models/llm/kv_cache/matryoshka.py`; calibration, training and the rank search in `matryoshka_training.py`.

The job fits the projection on the model's train split (PCA init, then distillation with Matryoshka rank
sampling), searches per-head ranks for each KV budget, measures held-out perplexity at uniform and searched ranks
against the PCA projection, and registers a model folder carrying `kv_projection.safetensors` and the rank
tables, which a deployment serves with `engine.kv_cache = "matryoshka-kv"`.
"""

from __future__ import annotations

import copy
import shutil
import time

import torch
from pydantic import Field

from models.context import RunContext, cpu_threads
from models.datasets import load_builtin
from models.llm.base import base_model
from models.llm.data import random_windows, sampled_stream, split_windows
from models.llm.evaluation import perplexity
from models.llm.folder import load_folder
from models.llm.kv_cache.matryoshka import KVProjection, projected, save_projection
from models.llm.kv_cache.matryoshka_training import calibrate, greedy_ranks, train_projection
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction


class MatryoshkaKVParams(MethodParams):
    model: str = Field("", description="a registered name[@version] or imported folder (empty: the cached tiny base)")
    seq_len: int = Field(256, ge=16, le=1 << 20, description="tokens per training / evaluation window")
    steps: int = Field(150, ge=0, le=100_000, description="training steps (0: PCA only)")
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, le=1.0)
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


def fit_and_measure(ctx: RunContext, folder, params: MatryoshkaKVParams, seed: int) -> dict:
    """PCA and trained projections, the uniform-rank ppl curves of both, and searched-rank ppl per fraction."""
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
    ctx.progress(0, 4, "PCA calibration")
    pca = calibrate(model, calibration)
    dense = perplexity(model, windows, batch_size=4)
    pca_curve = uniform_curve(model, pca, windows, ranks)
    trained = copy.deepcopy(pca)
    ctx.progress(1, 4, "training")
    losses = train_projection(
        model,
        trained,
        stream,
        steps=params.steps,
        batch_size=params.batch_size,
        seq_len=params.seq_len,
        lr=params.lr,
        rank_step=params.rank_step,
        seed=seed,
        on_step=lambda s, loss: (ctx.log(s, train_loss=loss), not ctx.cancelled())[1],
    )
    trained_curve = uniform_curve(model, trained, windows, ranks)
    ctx.progress(2, 4, "rank search")
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
)
def run(ctx: RunContext, params: MatryoshkaKVParams) -> None:
    """Fit, search ranks, measure against PCA, and register a folder a deployment can serve compressed."""
    with cpu_threads(ctx.resources):
        folder = ctx.load_model(params.model) if params.model else base_model(ctx)
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
    """The notes' protocol (TL-S, ranks 8…64 of 128, 64 calibration sequences, 150 steps of 8×256, teacher = the
    frozen model) on the tiny base (head_dim 32: ranks 8…32, rank step 4, greedy cut 8), 8 calibration windows."""
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
        else MatryoshkaKVParams()
    )
    with cpu_threads(ctx.resources):
        result = fit_and_measure(ctx, base_model(ctx, smoke), params, seed)
    ranks, dense = result["ranks"], result["dense"]
    half = ranks.index(result["head_dim"] // 2) if result["head_dim"] // 2 in ranks else len(ranks) // 2
    pca, trained = result["pca"][half], result["trained"][half]
    searched = result["searched"][0.5]["ppl"]
    quality_holds = trained - dense <= 0.5 * (pca - dense)
    hetero_holds = searched <= trained
    note = (
        f"dense ppl {dense:.2f}; uniform ranks {ranks} of {result['head_dim']}: PCA "
        + ", ".join(f"{p:.2f}" for p in result["pca"])
        + "; trained (one checkpoint) "
        + ", ".join(f"{p:.2f}" for p in result["trained"])
        + f"; at 50%: Δppl trained {trained - dense:+.2f} vs PCA {pca - dense:+.2f} "
        f"({'≤' if quality_holds else '>'} half), searched per-head ranks {searched:.2f} vs uniform {trained:.2f} "
        f"(K ranks {result['searched'][0.5]['rank_k'].tolist()}, "
        f"V ranks {result['searched'][0.5]['rank_v'].tolist()}); "
        f"{params.steps} steps, final loss {result['losses'][-1] if result['losses'] else float('nan'):.3f}; "
        f"{time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=trained,
        baseline=pca,
        seeds=1,
        holds=quality_holds and hetero_holds,
        note=note,
        details={
            "dense": dense,
            "ranks": ranks,
            "pca": result["pca"],
            "trained": result["trained"],
            "searched_50": searched,
            "quality_holds": quality_holds,
            "hetero_holds": hetero_holds,
        },
    )
