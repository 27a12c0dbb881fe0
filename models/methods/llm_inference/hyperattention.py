"""HyperAttention as an evaluation method, and its reproduction.

Paper: Insu Han, Rajesh Jayaram, Amin Karbasi, Vahab Mirrokni, David P. Woodruff and Amir Zandieh, "HyperAttention:
Long-context Attention in Near-Linear Time" (ICLR 2024, arXiv 2310.05869). Reference code:
https://github.com/insuhan/hyper-attn (`models/attention/hyper_attn.py`, `angular_lsh.py`), consulted for the
defaults only; `models/llm/attention/hyperattention.py` is our own torch implementation.

Mechanism (non-causal, the paper's Alg. 1 with the sortLSH mask of Alg. 2): an angular LSH with r hyperplanes
hashes queries and keys, buckets are ranked in Gray-code order and Q and K sorted by rank, so that large entries of
QKᵀ fall near the diagonal; exact attention inside diagonal blocks of b sorted queries gives (O₁, lse₁); attention
to m uniformly sampled keys, leaving out samples in a query's own block, gives (O₂, lse₂) with lse₂ raised by
ln(n/m) so the sample stands for the whole residual; the two merge exactly by their log-sum-exp,

    lse = logaddexp(lse₁, lse₂),   O = e^{lse₁ − lse}·O₁ + e^{lse₂ − lse}·O₂

(the paper's c = σ(lse₁ − lse₂), O = c·O₁ + (1 − c)·O₂), then unsort. Causal attention (Alg. 4) is exact up to
`min_seq_len`; above it the two diagonal halves recurse and the fully visible off-diagonal block is approximated as
above and lse-merged into the second half. Randomness (hyperplanes, samples) comes from a generator seeded per
layer and call shape, so a forward pass is deterministic for a given `seed`.

A deployment selects HyperAttention through transformers' `AttentionInterface` (`register_hyperattention(config,
name)`, then `model.set_attn_implementation(name)`); prefill of the patched layers is approximate, decoding exact.
The job measures held-out perplexity with HyperAttention in the last ℓ layers against exact attention, and one
layer's time against SDPA at a long sequence length.

Defaults: the reference code's are 7 hyperplanes, b = m = 256 and min_seq_len 4096 on GPUs; ours keep the 7
hyperplanes and scale the rest to the tiny base's 512-token context (b = m = 64, min_seq_len 128). Deviations: the
residual is sampled uniformly rather than by the row norms of V (as the public implementation also does), and
timings are CPU against PyTorch's fused SDPA, not against FlashAttention on a GPU. Every exact piece (the causal
leaves, the LSH-sorted diagonal blocks, the samples) runs as a batch of dense tiles through one fused kernel that
also returns the lse (`models/llm/attention/flex.py`: SDPA's CPU flash kernel on CPU, FlexAttention elsewhere),
all splits of one depth at once; the pure-torch path remains for float64 and autograd.
"""

from __future__ import annotations

import statistics
import time

from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.llm.attention.hyperattention import HyperConfig, hyper_attention, register_hyperattention
from models.llm.attention.measure import AttentionEvalParams, held_out_windows, perplexity_with, versus_sdpa
from models.llm.base import RECIPES, base_model, base_model_name, model_folder
from models.llm.folder import CausalLM, load_folder
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep


class HyperAttentionParams(AttentionEvalParams):
    block_size: int = Field(64, ge=1, le=65536, description="b: queries per LSH-sorted diagonal block")
    sample_size: int = Field(64, ge=0, le=65536, description="m: uniformly sampled residual keys (0: none)")
    lsh_bits: int = Field(7, ge=0, le=16, description="angular-LSH hyperplanes (2^bits buckets)")
    min_seq_len: int = Field(128, ge=1, le=1 << 20, description="the causal recursion is exact at or below this")
    last_layers: int = Field(0, ge=0, le=1024, description="patch only the last ℓ layers (0: all)")
    timing_length: int = Field(8192, ge=0, le=1 << 17, description="one-layer timing length vs SDPA (0: skip)")


def hyper_config(params: HyperAttentionParams, seed: int) -> HyperConfig:
    return HyperConfig(
        params.block_size,
        params.sample_size,
        params.lsh_bits,
        params.min_seq_len,
        params.last_layers or None,
        seed=seed,
    )


def one_layer_times(
    length: int, config: HyperConfig, heads: int = 1, head_dim: int = 64, repeats: int = 2
) -> dict[str, float]:
    """Seconds of one causal attention call at `length`: SDPA and HyperAttention on its default path (the tiles),
    same inputs, same thread (`measure.versus_sdpa`)."""
    times = versus_sdpa(
        length, lambda q, k, v: hyper_attention(q, k, v, head_dim**-0.5, config), heads, head_dim, repeats
    )
    return {"sdpa": times["sdpa"], "hyperattention": times["method"]}


@method(
    "hyperattention",
    family="llm-inference",
    task="evaluate",
    datasets=("text-corpus",),
    params=HyperAttentionParams,
    paper="HyperAttention: Long-context Attention in Near-Linear Time",
    tiny={
        "model": base_model_name(smoke=True),
        "block_size": 16,
        "sample_size": 16,
        "min_seq_len": 16,
        "seq_len": 64,
        "eval_windows": 2,
        "timing_length": 256,
    },
)
def run(ctx: RunContext, params: HyperAttentionParams) -> None:
    """Held-out perplexity with HyperAttention vs exact attention, and one-layer time vs SDPA."""
    lm = load_folder(model_folder(ctx, params.model))
    windows = held_out_windows(
        ctx, lm.tokenizer, lm.model.config.max_position_embeddings, params.seq_len, params.eval_windows
    )
    config = hyper_config(params, ctx.seed or 0)
    name = register_hyperattention(config, name=f"hyperattention-job-{ctx.job_id or 'local'}")
    ctx.progress(0, 3, "exact perplexity")
    stop_if_cancelled(ctx)
    exact = perplexity_with(lm.model, "sdpa", windows)
    ctx.progress(1, 3, "HyperAttention perplexity")
    stop_if_cancelled(ctx)
    approx = perplexity_with(lm.model, name, windows)
    metrics = {"val_ppl": approx, "val_ppl_exact": exact, "delta_ppl": approx - exact}
    if params.timing_length:
        ctx.progress(2, 3, f"one-layer timing at {params.timing_length}")
        stop_if_cancelled(ctx)
        times = one_layer_times(params.timing_length, config)
        metrics |= {
            "sdpa_seconds": times["sdpa"],
            "hyper_seconds": times["hyperattention"],
            "speedup": times["sdpa"] / times["hyperattention"],
        }
    ctx.log(0, **metrics)
    ctx.progress(3, 3, f"ppl {exact:.3f} → {approx:.3f} with HyperAttention (b={params.block_size})")


# -- reproduction -------------------------------------------------------------------------------


def measure_seed(ctx: RunContext, lm: CausalLM, seed: int, block: int, smoke: bool) -> dict:
    """One seed of the reproduction: exact ppl, ppl by block size (all layers) and by ℓ, and one-layer times, on the
    `block`-th set of held-out windows with HyperAttention's hyperplanes and samples drawn from `seed`."""
    context = lm.model.config.max_position_embeddings
    windows = held_out_windows(ctx, lm.tokenizer, context, 64 if smoke else 512, 2 if smoke else 16, block)
    min_len = 16 if smoke else 64
    exact = perplexity_with(lm.model, "sdpa", windows)
    by_block: dict[int, float] = {}
    for b in (16,) if smoke else (32, 64, 128):
        stop_if_cancelled(ctx)
        name = register_hyperattention(HyperConfig(b, b, min_seq_len=min_len, seed=seed), f"hyper-repro-b{b}")
        by_block[b] = perplexity_with(lm.model, name, windows)
    b_layers = 16 if smoke else 32
    by_layers: dict[int, float] = {}
    for ell in range(1, lm.model.config.num_hidden_layers + 1):
        stop_if_cancelled(ctx)
        name = register_hyperattention(
            HyperConfig(b_layers, b_layers, min_seq_len=min_len, last_layers=ell, seed=seed), f"hyper-repro-l{ell}"
        )
        by_layers[ell] = perplexity_with(lm.model, name, windows)
    lengths = (512, 1024) if smoke else (2048, 8192, 16384)
    timing_config = HyperConfig(128, 128, min_seq_len=128 if smoke else 512, seed=seed)
    times = {}
    for length in lengths:
        stop_if_cancelled(ctx)
        times[length] = one_layer_times(length, timing_config)
    longest = lengths[-1]
    return {
        "window": windows.shape[1],
        "exact": exact,
        "by_block": by_block,
        "b_layers": b_layers,
        "by_layers": by_layers,
        "times": times,
        "timing_min_seq_len": timing_config.min_seq_len,
        "speedup": times[longest]["sdpa"] / times[longest]["hyperattention"],
    }


@reproduction(
    "hyperattention",
    claim="HyperAttention costs little perplexity, the cost grows with the number ℓ of "
    "patched final layers, and one causal attention layer runs ≥3× faster than "
    "exact attention at long sequence length",
    metric="held-out ppl, all layers patched (b=m=64)",
    direction="lower",
    baseline="exact attention (SDPA)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """The tiny base at its full context (512 tokens, recursion down to 64 so most key pairs are approximated),
    b = m ∈ {32, 64, 128} in all layers and ℓ = 1…4 at b = 32; then one head (d = 64) timed at 2k, 8k and 16k
    tokens with b = m = 128 and min_seq_len 512, against SDPA in the same process. Each seed draws its own
    hyperplanes and samples and evaluates its own disjoint block of 16 held-out windows; the ℓ trend and the
    speed-up are judged on the means over seeds."""
    start = time.perf_counter()
    lm = load_folder(base_model(ctx, smoke))
    runs = [
        measure_seed(ctx, lm, s, s - seed, smoke)
        for s in sweep(ctx, seeds_for(seed, smoke), label=lambda s: f"seed {s}")
    ]
    first = runs[0]
    headline = 64 if 64 in first["by_block"] else next(iter(first["by_block"]))
    exact = statistics.fmean(r["exact"] for r in runs)
    by_block = {b: statistics.fmean(r["by_block"][b] for r in runs) for b in first["by_block"]}
    by_layers = {ell: statistics.fmean(r["by_layers"][ell] for r in runs) for ell in first["by_layers"]}
    speedup = statistics.fmean(r["speedup"] for r in runs)
    longest = max(first["times"])
    times = {
        length: {k: statistics.fmean(r["times"][length][k] for r in runs) for k in t}
        for length, t in first["times"].items()
    }
    deltas = [by_layers[ell] - exact for ell in sorted(by_layers)]
    monotone = all(a <= b for a, b in zip(deltas, deltas[1:]))
    ells, blocks = sorted(by_layers), sorted(by_block)
    b_layers = first["b_layers"]
    panels = {
        "val ppl vs patched final layers ℓ": {
            f"HyperAttention b=m={b_layers}": (ells, [by_layers[e] for e in ells]),
            "exact": (ells, [exact] * len(ells)),
        },
        "val ppl vs block size (all layers)": {
            "HyperAttention": (blocks, [by_block[b] for b in blocks]),
            "exact": (blocks, [exact] * len(blocks)),
        },
    }
    ctx.save_artifact("hyperattention_ppl.png", curves_figure(panels, "ℓ / block size", ncols=2), kind="plot")
    note = (
        f"means over {len(runs)} seed(s); windows of {first['window']} tokens (the base was pre-trained on "
        f"{RECIPES[smoke].seq_len}-token windows); "
        f"ppl exact {exact:.3f}; all layers b=m: "
        + ", ".join(f"{b}→{p:.3f}" for b, p in by_block.items())
        + f"; Δppl by ℓ (b={b_layers}): "
        + ", ".join(f"{d:+.3f}" for d in deltas)
        + f" ({'monotone' if monotone else 'NOT monotone'}); one layer at T={longest} (1 head, d=64, "
        f"b=m=128, min_seq_len {first['timing_min_seq_len']}): SDPA {times[longest]['sdpa'] * 1e3:.0f} ms vs "
        f"HyperAttention {times[longest]['hyperattention'] * 1e3:.0f} ms = {speedup:.2f}× "
        f"({'≥' if speedup >= 3 else '<'} the claimed 3×; the paper's 3× is at 16k+ against FlashAttention on "
        f"GPU, here the tiles through SDPA's fused CPU kernel against dense fused SDPA); "
        f"{time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=[r["by_block"][headline] for r in runs],
        baseline=[r["exact"] for r in runs],
        holds=monotone and speedup >= 3,
        note=note,
        details={
            "ppl_exact": exact,
            "ppl_by_block": by_block,
            "ppl_by_last_layers": by_layers,
            "times": {str(k): v for k, v in times.items()},
            "speedup": speedup,
            "speedup_by_seed": [r["speedup"] for r in runs],
        },
    )
