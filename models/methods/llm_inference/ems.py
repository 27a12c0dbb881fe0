"""EMS-style head-wise evict-then-merge KV-cache compression as an evaluation method, and its reproduction.

Paper: "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
Importance" (arXiv 2412.08521). Its method section could not be read; `models/llm/kv_cache/ems.py` implements the
reconstruction of `shared/methods/ems-notes.md` (global-local score with mean alignment, per-head evict-then-merge
into class centres, the zero class as one batched scatter) and lists every reconstructed choice, so this method is
"EMS-style", not the paper's exact algorithm.

The job compresses each held-out window's context at prefill to a per-head budget and measures the continuation's
perplexity, passkey retrieval and the KV bytes held, for EMS-style and the kvpress baselines at the same budget:
StreamingLLM, H2O (kvpress's ObservedAttention), SnapKV and AdaKV (over SnapKV) — our versions, checked against
kvpress's scores and selections in `tests/unit/test_kv_cache.py` (kvpress 0.5 cannot hook transformers 5.24).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import Field

from models.context import RunContext, cpu_threads
from models.datasets import Dataset, load_builtin
from models.llm.base import base_model
from models.llm.data import split_windows, token_stream
from models.llm.folder import load_folder
from models.llm.kv_cache.cache import HEADWISE_ATTENTION
from models.llm.kv_cache.ems import EMS
from models.llm.kv_cache.evaluation import budget_sweep, passkey_cells
from models.llm.kv_cache.press import Press
from models.llm.kv_cache.presses import H2O, AdaKV, SnapKV, StreamingLLM
from models.llm.passkey import PasskeySample, passkey_samples
from models.llm.retrieval_tuning import retrieval_model
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction


class EMSParams(MethodParams):
    model: str = Field("", description="a registered name[@version] or imported folder (empty: the cached tiny base)")
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


def passkey_set(ctx: RunContext, tokenizer, params: EMSParams) -> list[PasskeySample]:
    """Passkey prompts of `seq_len` tokens from the validation split, needles at depths 0.1, 0.3, 0.5."""
    stream = token_stream(tokenizer, held_out(ctx).val["text"], max_tokens=40 * params.seq_len)
    return (
        passkey_samples(
            tokenizer, stream, params.seq_len, (0.1, 0.3, 0.5), params.passkey_per_depth, seed=ctx.seed or 0
        )
        if params.passkey_per_depth
        else []
    )


def evaluate(ctx: RunContext, folder, params: EMSParams) -> dict[str, dict[int, dict]]:
    if params.context >= params.seq_len:
        raise ValueError(f"context ({params.context}) must be shorter than seq_len ({params.seq_len})")
    too_big = [b for b in params.budgets if b >= params.context]
    if too_big:
        raise ValueError(f"budgets {too_big} keep the whole {params.context}-token context; use budgets below it")
    lm = load_folder(folder)
    ds = held_out(ctx)
    windows = split_windows(lm.tokenizer, ds.val["text"], params.seq_len, params.eval_windows)
    samples = passkey_set(ctx, lm.tokenizer, params)
    total = 1 + len(presses(params)) * len(params.budgets)
    done = [0]

    def progress(name: str, budget: int) -> None:
        done[0] += 1
        ctx.progress(done[0], total, f"{name} at budget {budget}")

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
)
def run(ctx: RunContext, params: EMSParams) -> None:
    """Continuation perplexity, passkey accuracy and KV bytes of EMS-style compression vs the kvpress baselines."""
    with cpu_threads(ctx.resources):
        table = evaluate(ctx, ctx.load_model(params.model) if params.model else base_model(ctx), params)
    metrics = {
        f"{key}_{name}_b{b}".replace("-", "_"): value
        for name, row in table.items()
        for b, cell in row.items()
        for key, value in cell.items()
        if key in ("ppl", "passkey", "kv_bytes")
    }
    ctx.log(0, **metrics)
    panels = {"continuation ppl": bytes_figure(table, "ppl"), "passkey accuracy": bytes_figure(table, "passkey")}
    ctx.save_artifact("ems_kv_bytes.png", curves_figure(panels, "KV KiB per sequence", ncols=2), kind="plot")


# -- reproduction -------------------------------------------------------------------------------


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
    """The notes' protocol (TL-S, passkey prompts, budgets 32/64/128) at the tiny base's pre-training length:
    256-token held-out windows, the first 192 compressed to 16, 32 or 64 slots per head and layer, the last 64
    scored; passkey prompts of 256 tokens compressed whole. The headline budget, 16 of 192 (8%), is the nearest to
    the paper's extreme budgets (256 of several thousand tokens). Training-free and deterministic."""
    start = time.perf_counter()
    params = (
        EMSParams(seq_len=64, context=48, eval_windows=2, budgets=[8, 16], window=4, passkey_per_depth=1)
        if smoke
        else EMSParams(passkey_per_depth=6)
    )
    with cpu_threads(ctx.resources):
        table = evaluate(ctx, base_model(ctx, smoke), params)
        # an extra record, not part of `holds`: the same passkey prompts on the retrieval-tuned base, which
        # retrieves well above chance where the plain base does not
        tuned = retrieval_model(ctx, smoke)
        tuned.model.set_attn_implementation(HEADWISE_ATTENTION)  # AdaKV's padded slots
        samples = passkey_set(ctx, tuned.tokenizer, params)
        tuned_passkey = {
            name: passkey_cells(tuned.model, samples, make(params.budgets[0]))
            for name, make in [("dense", lambda b: None), *presses(params).items()]
        }
    headline = params.budgets[0]
    baselines = {name: row[headline] for name, row in table.items() if name not in ("dense", "ems-style")}
    best_name = min(baselines, key=lambda n: baselines[n]["ppl"])
    ours = table["ems-style"][headline]
    ppl_holds = ours["ppl"] <= baselines[best_name]["ppl"]
    passkey_holds = ours["passkey"] >= table["snapkv"][headline]["passkey"]
    chance, n_samples = 1 / 5, 3 * params.passkey_per_depth
    dense = table["dense"][0]
    best_at = {
        b: min((n for n in table if n not in ("dense", "ems-style")), key=lambda n: table[n][b]["ppl"])
        for b in params.budgets
    }
    wins = [b for b in params.budgets if table["ems-style"][b]["ppl"] <= table[best_at[b]][b]["ppl"]]
    rows = "; ".join(
        f"B={b}: " + ", ".join(f"{name} {table[name][b]['ppl']:.2f}" for name in table if name != "dense")
        for b in params.budgets
    )
    note = (
        f"EMS-style = our reconstruction (paper's method section unreadable); ppl of the last "
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
        + ", ".join(f"{n} {c['passkey']:.0%}/{c['passkey_q']:.0%}" for n, c in tuned_passkey.items())
        + f"; {time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=ours["ppl"],
        baseline=baselines[best_name]["ppl"],
        seeds=1,
        holds=ppl_holds and passkey_holds,
        note=note,
        details={
            "table": {n: {str(b): c for b, c in row.items()} for n, row in table.items()},
            "best_baseline": best_name,
            "ppl_holds": ppl_holds,
            "passkey_holds": passkey_holds,
            "passkey_retrieval_tuned": tuned_passkey,
        },
    )
