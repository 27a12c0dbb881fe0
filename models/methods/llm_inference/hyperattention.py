"""HyperAttention as an evaluation method and its reproduction (Han et al., "HyperAttention: Long-context
Attention in Near-Linear Time", ICLR 2024). The algorithm is in `models/llm/attention/hyperattention.py`;
a deployment selects it through transformers' `AttentionInterface` (`register_hyperattention(config, name)`,
then `model.set_attn_implementation(name)`); prefill of the patched layers is approximate, decoding is exact.

The job measures a model's held-out perplexity with HyperAttention in its last ℓ layers against exact
attention, and one layer's attention time against SDPA at a long sequence length.
"""

from __future__ import annotations

import time

import torch.nn.functional as F
from pydantic import Field

from models.context import RunContext, cpu_threads
from models.llm.attention.hyperattention import HyperConfig, hyper_attention, register_hyperattention
from models.llm.attention.measure import AttentionEvalParams, best_time, held_out_windows, perplexity_with, random_qkv
from models.llm.base import RECIPES, base_model
from models.llm.folder import load_folder
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction


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
    """Seconds of one causal attention call at `length`: SDPA and HyperAttention, same inputs, same thread."""
    q, k, v = random_qkv(length, heads, head_dim)
    scale = head_dim**-0.5
    return {
        "sdpa": best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats),
        "hyperattention": best_time(lambda: hyper_attention(q, k, v, scale, config), repeats),
    }


@method(
    "hyperattention",
    family="llm-inference",
    task="evaluate",
    datasets=("text-corpus",),
    params=HyperAttentionParams,
    paper="HyperAttention: Long-context Attention in Near-Linear Time",
)
def run(ctx: RunContext, params: HyperAttentionParams) -> None:
    """Held-out perplexity with HyperAttention vs exact attention, and one-layer time vs SDPA."""
    with cpu_threads(ctx.resources):
        lm = load_folder(ctx.load_model(params.model) if params.model else base_model(ctx))
        windows = held_out_windows(
            ctx, lm.tokenizer, lm.model.config.max_position_embeddings, params.seq_len, params.eval_windows
        )
        config = hyper_config(params, ctx.seed or 0)
        name = register_hyperattention(config, name=f"hyperattention-job-{ctx.job_id or 'local'}")
        ctx.progress(0, 3, "exact perplexity")
        exact = perplexity_with(lm.model, "sdpa", windows)
        ctx.progress(1, 3, "HyperAttention perplexity")
        approx = perplexity_with(lm.model, name, windows)
        metrics = {"val_ppl": approx, "val_ppl_exact": exact, "delta_ppl": approx - exact}
        if params.timing_length:
            ctx.progress(2, 3, f"one-layer timing at {params.timing_length}")
            times = one_layer_times(params.timing_length, config)
            metrics |= {
                "sdpa_seconds": times["sdpa"],
                "hyper_seconds": times["hyperattention"],
                "speedup": times["sdpa"] / times["hyperattention"],
            }
    ctx.log(0, **metrics)
    ctx.progress(3, 3, f"ppl {exact:.3f} → {approx:.3f} with HyperAttention (b={params.block_size})")


# -- reproduction -------------------------------------------------------------------------------


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
    tokens
    with the notes' b = m = 128, min_seq_len 512, against SDPA in the same process."""
    start = time.perf_counter()
    with cpu_threads(ctx.resources):
        lm = load_folder(base_model(ctx, smoke))
        context = lm.model.config.max_position_embeddings
        windows = held_out_windows(ctx, lm.tokenizer, context, 64 if smoke else 512, 2 if smoke else 16)
        min_len = 16 if smoke else 64
        layers = lm.model.config.num_hidden_layers
        exact = perplexity_with(lm.model, "sdpa", windows)
        by_block: dict[int, float] = {}
        for b in (16,) if smoke else (32, 64, 128):
            name = register_hyperattention(HyperConfig(b, b, min_seq_len=min_len, seed=seed), f"hyper-repro-b{b}")
            by_block[b] = perplexity_with(lm.model, name, windows)
            ctx.progress(len(by_block), 8, f"b={b}: ppl {by_block[b]:.3f} (exact {exact:.3f})")
        b_layers = 16 if smoke else 32
        by_layers: dict[int, float] = {}
        for ell in range(1, layers + 1):
            name = register_hyperattention(
                HyperConfig(b_layers, b_layers, min_seq_len=min_len, last_layers=ell, seed=seed), f"hyper-repro-l{ell}"
            )
            by_layers[ell] = perplexity_with(lm.model, name, windows)
        lengths = (512, 1024) if smoke else (2048, 8192, 16384)
        timing_config = HyperConfig(128, 128, min_seq_len=128 if smoke else 512, seed=seed)
        times = {length: one_layer_times(length, timing_config) for length in lengths}
        ctx.progress(8, 8, "timed")
    longest = lengths[-1]
    speedup = times[longest]["sdpa"] / times[longest]["hyperattention"]
    deltas = [by_layers[ell] - exact for ell in sorted(by_layers)]
    monotone = all(a <= b for a, b in zip(deltas, deltas[1:]))
    ours = by_block[64] if 64 in by_block else next(iter(by_block.values()))
    ells, blocks = sorted(by_layers), sorted(by_block)
    curve = f"HyperAttention b=m={b_layers}"
    panels = {
        "val ppl vs patched final layers ℓ": {
            curve: (ells, [by_layers[e] for e in ells]),
            "exact": (ells, [exact] * len(ells)),
        },
        "val ppl vs block size (all layers)": {
            "HyperAttention": (blocks, [by_block[b] for b in blocks]),
            "exact": (blocks, [exact] * len(blocks)),
        },
    }
    ctx.save_artifact("hyperattention_ppl.png", curves_figure(panels, "ℓ / block size", ncols=2), kind="plot")
    note = (
        f"windows of {windows.shape[1]} tokens (the base was pre-trained on "
        f"{RECIPES[smoke].seq_len}-token windows); "
        f"ppl exact {exact:.3f}; all layers b=m: "
        + ", ".join(f"{b}→{p:.3f}" for b, p in by_block.items())
        + f"; Δppl by ℓ (b={b_layers}): "
        + ", ".join(f"{d:+.3f}" for d in deltas)
        + f" ({'monotone' if monotone else 'NOT monotone'}); one layer at T={longest} (1 head, d=64, "
        f"b=m=128, min_seq_len {timing_config.min_seq_len}): SDPA {times[longest]['sdpa'] * 1e3:.0f} ms vs "
        f"HyperAttention {times[longest]['hyperattention'] * 1e3:.0f} ms = {speedup:.2f}× "
        f"({'≥' if speedup >= 3 else '<'} the claimed 3×; the paper's 3× is at 16k+ against FlashAttention on "
        f"GPU, "
        f"here pure-torch CPU against fused SDPA); {time.perf_counter() - start:.0f}s"
    )
    return Outcome(
        ours=ours,
        baseline=exact,
        seeds=1,
        holds=monotone and speedup >= 3,
        note=note,
        details={
            "ppl_exact": exact,
            "ppl_by_block": by_block,
            "ppl_by_last_layers": by_layers,
            "times": {str(k): v for k, v in times.items()},
            "speedup": speedup,
        },
    )
