"""EMS-style head-wise evict-then-merge KV-cache compression as an evaluation method, and its reproduction.

Paper: Yingxin Li, Ye Li, Yuan Meng, Xinzhu Ma, Zihan Geng, Shutao Xia and Zhi Wang, "EMS: Adaptive
Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local Importance" (arXiv 2412.08521).
No reference code is public, and the paper's method section could not be read: only its abstract, the reviews of
its ICLR 2025 submission and a third-party related-work table were. What the paper states is the three parts —
a Global-Local importance score that mean-aligns attention accumulated over all queries with attention from the
recent ones, a per-head Evict-then-Merge step that evicts more in sparse heads and merges more in redundant ones,
and a "zero class" that lets all heads compress in one batched operation. The equations are ours
(`models/llm/kv_cache/ems.py` lists every reconstructed choice), so the method is reported as "EMS-style". Per
layer and KV head, with A the causal attention of the T context tokens and w the observation window:

    s_Glo[j] = Σ_i A[i, j] / (T − j)                       (H2O's score, normalised by the queries that see j)
    s_Loc[j] = SnapKV's pooled attention from the last w queries
    s_GL[j]  = s_Glo[j] · mean(s_Loc) / mean(s_Glo) + s_Loc[j]          (the mean alignment)

The last w tokens are kept; the top B − w tokens by s_GL become class centres; of the rest, the head's sparsity
(the centres' share of the s_GL mass) sets how many lowest-scored tokens are evicted, and every other token joins
its most similar centre when cos(K)·cos(V) ≥ τ — the centre's key and value become s_GL-weighted convex means —
else the zero class. Slot 0 of one batched `scatter_add` is that zero class and is dropped, so every head ends with
exactly B slots however it split its tokens.

The job compresses each held-out window's context at prefill to a per-head budget B and measures the
continuation's perplexity, passkey retrieval and the KV bytes held, for EMS-style and, at the same budget, the
kvpress baselines: StreamingLLM, H2O (kvpress's ObservedAttention), SnapKV and AdaKV (over SnapKV) — our versions,
checked against kvpress's scores and selections in `tests/unit/kits/test_kv_cache.py` (kvpress 0.5 cannot hook
transformers 5.24).

Defaults are ours, the paper's being unreadable: an observation window of 8 (SnapKV uses 32 on contexts of
thousands of tokens; these are 192) with SnapKV's pooling kernel 5, τ = 0.5, StreamingLLM's 4 sinks, and budgets
of 16, 32 and 64 slots of a 192-token context (8–33%, the nearest this scale comes to the paper's budget of 256
tokens of several thousand).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.datasets import Dataset, load_builtin
from models.llm.attention.measure import MODEL_FIELD_DESCRIPTION, held_out_block
from models.llm.base import base_model, base_model_name, model_folder
from models.llm.data import token_stream
from models.llm.folder import load_folder
from models.llm.kv_cache.cache import HEADWISE_ATTENTION
from models.llm.kv_cache.ems import EMS
from models.llm.kv_cache.evaluation import budget_sweep, passkey_cells
from models.llm.kv_cache.press import Press
from models.llm.kv_cache.presses import H2O, AdaKV, SnapKV, StreamingLLM
from models.llm.passkey import PasskeySample, passkey_samples
from models.llm.retrieval_tuning import retrieval_model
from models.model_params import model_field
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

REPORTED = ("ppl", "passkey", "kv_bytes")


class EMSParams(MethodParams):
    model: str = model_field(
        MODEL_FIELD_DESCRIPTION,
        "causal-lm",
        "llama",
        builtin=(base_model_name(smoke=True), base_model_name(smoke=False)),
    )
    seq_len: int = Field(256, ge=16, le=1 << 20, description="tokens per held-out window (context + continuation)")
    context: int = Field(192, ge=8, le=1 << 20, description="tokens compressed at prefill; the rest are scored")
    eval_windows: int = Field(32, ge=1, le=4096, description="held-out windows")
    budgets: list[int] = Field([16, 32, 64], min_length=1, description="KV slots kept per head and layer")
    window: int = Field(8, ge=1, le=4096, description="observation window (always kept) of EMS and SnapKV")
    tau: float = Field(0.5, description="merge threshold on cos(K)·cos(V); above 1: eviction only")
    sinks: int = Field(4, ge=0, le=4096, description="StreamingLLM's sink tokens")
    passkey_per_depth: int = Field(4, ge=0, le=256, description="passkey samples at each of 3 depths (0: skip)")


def presses(params: EMSParams) -> dict[str, Callable[[int], Press]]:
    return {
        "ems-style": lambda b: EMS(b, window=params.window, tau=params.tau),
        "snapkv": lambda b: SnapKV(b, window=params.window),
        "adakv": lambda b: AdaKV(b, window=params.window),
        "h2o": lambda b: H2O(b),
        "streaming-llm": lambda b: StreamingLLM(b, sinks=params.sinks),
    }


def held_out(ctx: RunContext) -> Dataset:
    return ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")


def passkey_set(ctx: RunContext, tokenizer, params: EMSParams, seed: int) -> list[PasskeySample]:
    """Passkey prompts of `seq_len` tokens from the validation split, needles at depths 0.1, 0.3, 0.5."""
    if not params.passkey_per_depth:
        return []
    stream = token_stream(tokenizer, held_out(ctx).val["text"], max_tokens=40 * params.seq_len)
    return passkey_samples(tokenizer, stream, params.seq_len, (0.1, 0.3, 0.5), params.passkey_per_depth, seed=seed)


def evaluate(ctx: RunContext, folder: Path, params: EMSParams, seed: int, block: int = 0) -> dict[str, dict[int, dict]]:
    """The budget sweep on the `block`-th set of `eval_windows` held-out windows, passkey prompts drawn with
    `seed`; progress after every (press, budget) cell, and `Cancelled` there when the run was cancelled."""
    if params.context >= params.seq_len:
        raise ValueError(f"context ({params.context}) must be shorter than seq_len ({params.seq_len})")
    too_big = [b for b in params.budgets if b >= params.context]
    if too_big:
        raise ValueError(f"budgets {too_big} keep the whole {params.context}-token context; use budgets below it")
    lm = load_folder(folder)
    windows = held_out_block(lm.tokenizer, held_out(ctx).val["text"], params.seq_len, params.eval_windows, block)
    samples = passkey_set(ctx, lm.tokenizer, params, seed)
    total = 1 + len(presses(params)) * len(params.budgets)
    done = [0]

    def progress(name: str, budget: int) -> None:
        done[0] += 1
        ctx.progress(done[0], total, f"{name} at budget {budget}")
        stop_if_cancelled(ctx)

    return budget_sweep(lm.model, windows, params.context, presses(params), tuple(params.budgets), samples, progress)


def bytes_figure(table: dict[str, dict[int, dict]], key: str):
    dense = table["dense"][0]
    series = {
        name: ([row[b]["kv_bytes"] / 1024 for b in sorted(row)], [row[b][key] for b in sorted(row)])
        for name, row in table.items()
        if name != "dense"
    }
    series["dense"] = ([dense["kv_bytes"] / 1024], [dense[key]])
    return series


@method(
    "ems",
    family="llm-inference",
    task="evaluate",
    datasets=("text-corpus",),
    params=EMSParams,
    paper="EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local Importance",
    tiny={
        "model": base_model_name(smoke=True),
        "seq_len": 48,
        "context": 32,
        "eval_windows": 2,
        "budgets": [8],
        "window": 4,
        "passkey_per_depth": 0,
    },
)
def run(ctx: RunContext, params: EMSParams) -> None:
    """Continuation perplexity, passkey accuracy and KV bytes of EMS-style compression vs the kvpress baselines."""
    table = evaluate(ctx, model_folder(ctx, params.model), params, ctx.seed or 0)
    metrics = {
        f"{key}_{name}_b{b}".replace("-", "_"): value
        for name, row in table.items()
        for b, cell in row.items()
        for key, value in cell.items()
        if key in REPORTED
    }
    ctx.log(0, **metrics)
    panels = {"continuation ppl": bytes_figure(table, "ppl"), "passkey accuracy": bytes_figure(table, "passkey")}
    ctx.save_artifact("ems_kv_bytes.png", curves_figure(panels, "KV KiB per sequence", ncols=2), kind="plot")


# -- reproduction -------------------------------------------------------------------------------


def mean_table(tables: list[dict[str, dict[int, dict]]]) -> dict[str, dict[int, dict[str, float]]]:
    """The seeds' tables averaged cell by cell over ppl, passkey and KV bytes."""
    return {
        name: {b: {key: statistics.fmean(t[name][b][key] for t in tables) for key in REPORTED} for b in tables[0][name]}
        for name in tables[0]
    }


@reproduction(
    "ems",
    claim="EMS-style evict-then-merge (our reconstruction; the paper's method section was not "
    "readable) gives the lowest perplexity at an extreme KV budget among the kvpress "
    "baselines, and passkey retrieval at least SnapKV's",
    metric="continuation ppl at 16 KV slots per head (8% of a 192-token context)",
    direction="lower",
    baseline="best of StreamingLLM, H2O, SnapKV, AdaKV at the same budget",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """The paper's setting (LongBench and needle retrieval at a budget of 256 tokens) scaled to the tiny base at
    its pre-training length: 256-token held-out windows, the first 192 compressed to 16, 32 or 64 slots per head
    and layer, the last 64 scored; passkey prompts of 256 tokens compressed whole. The headline budget, 16 of 192
    (8%), is the nearest to the paper's extreme budgets. Training-free and deterministic given its data, so each
    seed evaluates its own disjoint block of 32 held-out windows and its own passkey prompts; the baseline is the
    kvpress press with the lowest mean perplexity over the seeds."""
    start = time.perf_counter()
    params = (
        EMSParams(seq_len=64, context=48, eval_windows=2, budgets=[8, 16], window=4, passkey_per_depth=1)
        if smoke
        else EMSParams(passkey_per_depth=6)
    )
    folder = base_model(ctx, smoke)
    # an extra record, not part of the claim: the same passkey prompts on the retrieval-tuned base, which
    # retrieves well above chance where the plain base does not
    tuned = retrieval_model(ctx, smoke)
    tuned.model.set_attn_implementation(HEADWISE_ATTENTION)  # AdaKV's padded slots
    tables, tuned_passkey = [], []
    for s in sweep(ctx, seeds_for(seed, smoke), label=lambda s: f"seed {s}"):
        tables.append(evaluate(ctx, folder, params, s, block=s - seed))
        samples = passkey_set(ctx, tuned.tokenizer, params, s)
        tuned_passkey.append(
            {
                name: passkey_cells(tuned.model, samples, make(params.budgets[0]))
                for name, make in [("dense", lambda b: None), *presses(params).items()]
            }
        )
    table = mean_table(tables)
    headline = params.budgets[0]
    baselines = [name for name in table if name not in ("dense", "ems-style")]
    best_name = min(baselines, key=lambda n: table[n][headline]["ppl"])
    ours = table["ems-style"][headline]
    passkey_holds = ours["passkey"] >= table["snapkv"][headline]["passkey"]
    chance, n_samples = 1 / 5, 3 * params.passkey_per_depth * len(tables)
    dense = table["dense"][0]
    best_at = {b: min(baselines, key=lambda n: table[n][b]["ppl"]) for b in params.budgets}
    wins = [b for b in params.budgets if table["ems-style"][b]["ppl"] <= table[best_at[b]][b]["ppl"]]
    rows = "; ".join(
        f"B={b}: " + ", ".join(f"{name} {table[name][b]['ppl']:.2f}" for name in table if name != "dense")
        for b in params.budgets
    )
    tuned_mean = {
        name: {key: statistics.fmean(run[name][key] for run in tuned_passkey) for key in ("passkey", "passkey_q")}
        for name in tuned_passkey[0]
    }
    note = (
        f"EMS-style = our reconstruction (paper's method section unreadable); means over {len(tables)} seed(s), "
        f"each on its own {params.eval_windows} held-out windows: ppl of the last "
        f"{params.seq_len - params.context} tokens, dense {dense['ppl']:.2f} ({dense['kv_bytes'] / 1024:.0f} KiB); "
        f"{rows}; EMS-style lowest at B ∈ {wins or 'none'}"
        + "".join(f", {best_at[b]} lowest at B={b}" for b in params.budgets if b not in wins)
        + f"; KV bytes at B={headline}: {ours['kv_bytes'] / dense['kv_bytes']:.3f}× dense; passkey (true key "
        f"ranked first of 5, chance {chance:.0%}) dense {dense['passkey']:.0%}, EMS-style {ours['passkey']:.0%}, "
        f"SnapKV {table['snapkv'][headline]['passkey']:.0%}"
        + (
            " — dense is within 2 standard errors of chance, so the passkey half is untestable at this scale"
            if dense["passkey"] <= chance + 2 * (chance * (1 - chance) / max(n_samples, 1)) ** 0.5
            else ""
        )
        + f"; on the retrieval-tuned base (models/llm/retrieval_tuning.py, not part of the verdict) passkey at "
        f"B={headline}, question read after compression / compressed with the context: "
        + ", ".join(f"{n} {c['passkey']:.0%}/{c['passkey_q']:.0%}" for n, c in tuned_mean.items())
        + f"; {time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=[t["ems-style"][headline]["ppl"] for t in tables],
        baseline=[t[best_name][headline]["ppl"] for t in tables],
        holds=passkey_holds,
        note=note,
        details={
            "table": {n: {str(b): c for b, c in row.items()} for n, row in table.items()},
            "tables_by_seed": [{n: {str(b): c for b, c in row.items()} for n, row in t.items()} for t in tables],
            "best_baseline": best_name,
            "passkey_holds": passkey_holds,
            "passkey_retrieval_tuned": tuned_passkey,
        },
    )
