"""One causal attention layer's time against sequence length on CPU, one thread: exact SDPA (torch's fused
kernel), HyperAttention (`models/llm/attention/hyperattention.py`, the paper's code defaults b = m = 128,
min_seq_len 512, 7 hyperplanes) and HiP (`models/llm/attention/hip.py`, the reference code's v1.1
defaults k = 512, b_q = 64, b_k = 2, window 256, 16 sinks), with the log-log slope of time vs T fitted
per method (2 = quadratic, ≈1 = near-linear) and each time printed as a ratio against SDPA
(`hip-mask` is HiP's tree search alone), measured in the same run at the same length.

One head of width 64, Gaussian q/k/v (content does not change the cost); the fastest of `--repeats` calls.

Then KV bytes against quality on the cached tiny base (`--no-kv` skips it): held-out 256-token windows whose first
192 tokens are compressed at prefill to 16/32/64 slots per head by EMS-style evict-then-merge and our versions of
the kvpress presses (StreamingLLM, H2O, SnapKV, AdaKV), ThinK key-channel pruning alone (λ = 25/50/75%) and at
λ = 50% over SnapKV (the paper's main setting; bytes count only the kept key channels), and MatryoshkaKV
projections (PCA-initialised, then `--kv-train-steps` distillation steps) at uniform ranks 8..32 of 32;
continuation perplexity (of the cached base), passkey accuracy and KV bytes, each bytes figure printed as a ratio
of the dense cache measured in the same run. Passkey (256-token prompts, needles at depths 0.1..0.9, printed per
depth in brackets; the true key ranked first of 5, chance 0.20; the context compressed before the question is read,
and `q-in-context` with the question compressed too, which query-aware presses use) runs on the retrieval-tuned base
(`models/llm/retrieval_tuning.py`), since the plain base retrieves at chance; its dense accuracy at 128/256/512
tokens is printed first for both models. MatryoshkaKV rows have no passkey (the projection is fit on the base).

Then end-to-end decoding (`--no-ppd` skips it): PPD prompt tokens trained on the tiny base (`--ppd-train-steps`),
held-out prefixes decoded by greedy decoding, PPD with the chain of top-1 guesses, PPD with the sparse tree whose
size is chosen from verification latency measured in the same run, and transformers' prompt-lookup decoding;
tokens/s and generated tokens per forward, printed as ratios against greedy decoding.

    .venv/bin/python bench/long_context.py            # 1k..16k, ~1-2 min on a busy core, then the KV rows
    .venv/bin/python bench/long_context.py --quick    # 512..2k, seconds; fewer KV windows
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from models.llm.attention.hip import HiPConfig, hip_attention, tree_search
from models.llm.attention.hyperattention import HyperConfig, hyper_attention
from models.llm.attention.measure import best_time, random_qkv


def loglog_slope(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) on log(T)."""
    xs, ys = [math.log(t) for t in lengths], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def kv_rows(quick: bool, train_steps: int) -> dict:
    """The KV-bytes rows (module docstring): {method: {budget or rank: {ppl, passkey, kv_bytes, ratio}}}."""
    from models.context import InMemoryRunContext
    from models.datasets import load_builtin
    from models.llm.base import base_model
    from models.llm.data import random_windows, sampled_stream, split_windows, token_stream
    from models.llm.folder import load_folder
    from models.llm.kv_cache.ems import EMS
    from models.llm.kv_cache.evaluation import budget_sweep, continuation_nll, passkey_cells
    from models.llm.kv_cache.matryoshka import ProjectedCache, projected
    from models.llm.kv_cache.matryoshka_training import calibrate, train_projection
    from models.llm.kv_cache.presses import H2O, AdaKV, SnapKV, StreamingLLM
    from models.llm.kv_cache.think import ThinK
    from models.llm.passkey import passkey_samples
    from models.llm.retrieval_tuning import retrieval_model

    lm = load_folder(base_model(InMemoryRunContext()))
    tuned = retrieval_model(InMemoryRunContext())  # passkey runs on the retrieval-tuned base (module docstring)
    ds = load_builtin("stdlib-code")
    windows = split_windows(lm.tokenizer, ds.val["text"], 256, 4 if quick else 16)
    stream = token_stream(lm.tokenizer, ds.val["text"], max_tokens=100 * 512)
    depths, per_depth = (0.1, 0.3, 0.5, 0.7, 0.9), 2 if quick else 6
    retrieval = {}  # dense passkey of the plain and the tuned base at several lengths (chance 0.20)
    for length in (128, 256, 512):
        at = passkey_samples(lm.tokenizer, stream, length, depths, per_depth, seed=length)
        retrieval[length] = {"base": passkey_cells(lm.model, at, None), "tuned": passkey_cells(tuned.model, at, None)}
        print(
            f"passkey dense L={length}: base {retrieval[length]['base']['passkey']:.2f}  retrieval-tuned "
            f"{retrieval[length]['tuned']['passkey']:.2f}  by depth "
            + " ".join(f"{d}:{a:.2f}" for d, a in retrieval[length]["tuned"]["passkey_by_depth"].items()),
            flush=True,
        )
    samples = passkey_samples(lm.tokenizer, stream, 256, depths, per_depth)
    presses = {
        "ems-style": lambda b: EMS(b),
        "snapkv": lambda b: SnapKV(b),
        "adakv": lambda b: AdaKV(b),
        "h2o": lambda b: H2O(b),
        "streaming-llm": lambda b: StreamingLLM(b),
        "think50+snapkv": lambda b: ThinK(0.5, tokens=SnapKV(b)),
    }
    table = budget_sweep(lm.model, windows, 192, presses, (16, 32, 64), samples, passkey_model=tuned.model)
    # ThinK alone prunes key channels, not tokens: its rows are keyed by λ in percent
    table["think"] = budget_sweep(
        lm.model,
        windows,
        192,
        {"think": lambda pct: ThinK(pct / 100)},
        (25, 50, 75),
        samples,
        passkey_model=tuned.model,
    )["think"]
    dense = table["dense"][0]["kv_bytes"]
    train = sampled_stream(lm.tokenizer, ds.train["text"], 100_000)
    projection = calibrate(lm.model, random_windows(train, 8, 256, torch.Generator().manual_seed(0)))
    train_projection(
        lm.model, projection, train, steps=train_steps, batch_size=4, seq_len=256, lr=1e-3, rank_step=4, seed=0
    )
    table["matryoshka-kv"] = {}
    for rank in (8, 16, 24, 32):
        projection.set_ranks(rank, rank)
        with projected(lm.model, projection), torch.no_grad():
            # the same continuation ppl as the rows above, every token's keys/values projected
            ppl = continuation_nll(lm.model, windows, 192, None).ppl
            cache = ProjectedCache(projection)
            lm.model(input_ids=windows[:1, :192], cache=cache)  # the bytes a 192-token context holds
        table["matryoshka-kv"][rank] = {"ppl": ppl, "passkey": float("nan"), "kv_bytes": cache.kv_bytes()}
    for name, row in table.items():
        for key, cell in row.items():
            if "kv_bytes" in cell:
                cell["ratio"] = cell["kv_bytes"] / dense
                unit = {"matryoshka-kv": "rank", "think": "λ%"}.get(name, "budget")
                depth = " ".join(f"{a:.2f}" for a in cell.get("passkey_by_depth", {}).values())
                depth_q = " ".join(f"{a:.2f}" for a in cell.get("passkey_q_by_depth", {}).values())
                print(
                    f"{name:14s} {unit:6s} {key:3d}: "
                    f"ppl {cell['ppl']:8.2f}  passkey {cell['passkey']:.2f} [{depth:24s}]  "
                    f"q-in-context {cell.get('passkey_q', float('nan')):.2f} [{depth_q:24s}]  "
                    f"KV {cell['kv_bytes'] / 1024:7.1f} KiB ({cell['ratio']:.3f}× dense)",
                    flush=True,
                )
    rows = {str(n): {str(k): c for k, c in row.items()} for n, row in table.items()}
    return {**rows, "passkey_dense_by_length": {str(n): c for n, c in retrieval.items()}}


def ppd_rows(quick: bool, train_steps: int, repeats: int) -> dict:
    """End-to-end decoding on the cached tiny base (module docstring): the same held-out prefixes decoded greedily
    (our serving loop, and transformers' `generate`), by PPD with the chain of top-1 guesses and with the sparse
    tree whose size the hardware-aware selector picks from latency measured in this run, and by transformers'
    prompt-lookup decoding; tokens/s (fastest of `repeats` rounds, methods interleaved) and generated tokens per
    forward after the prefill, each printed as a ratio of greedy's."""
    import time

    from models.context import InMemoryRunContext
    from models.datasets import load_builtin
    from models.llm.base import base_model
    from models.llm.data import sampled_stream, split_windows
    from models.llm.folder import load_folder
    from models.llm.generation import SamplingParams, generate_tokens
    from models.llm.parallel_prompt import PromptTokens, greedy_rank_acceptance, ppd_generate, train_prompts
    from models.llm.prompt_tree import hardware_aware_tree
    from models.methods.llm_inference.ppd import prompt_lookup_acceptance

    m, max_tokens, n_prefixes = 3, 64, 4 if quick else 8
    lm = load_folder(base_model(InMemoryRunContext()))
    ds = load_builtin("stdlib-code")
    prompts = PromptTokens.initialised(lm.model, m, seed=0)
    train_prompts(
        lm.model,
        prompts,
        sampled_stream(lm.tokenizer, ds.train["text"], 300_000),
        steps=train_steps,
        batch_size=8,
        seq_len=128,
        cuts_per_window=16,
    )
    held_out = split_windows(lm.tokenizer, ds.val["text"], 32, n_prefixes + 8)
    prefixes = held_out[:n_prefixes]  # the tree's rates come from the greedy continuations of the next 8
    rates = greedy_rank_acceptance(lm.model, prompts, held_out[n_prefixes:], max_tokens, 8)
    choice = hardware_aware_tree(lm.model, rates)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    reference = [list(generate_tokens(lm.model, p, greedy, torch.Generator())) for p in prefixes.tolist()]

    def plain_greedy() -> tuple[float, bool]:
        ours = [list(generate_tokens(lm.model, p, greedy, torch.Generator())) for p in prefixes.tolist()]
        return 1.0, ours == reference

    def hf_greedy() -> tuple[float, None]:  # min_new_tokens: the same lengths as prompt lookup's
        for p in prefixes:
            lm.model.generate(
                p[None], max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
        return 1.0, None

    def ppd(tree) -> tuple[float, bool]:
        results = [ppd_generate(lm.model, prompts, p, max_tokens, tree=tree) for p in prefixes.tolist()]
        steps = [a for r in results for a in r.accepted]
        return sum(steps) / len(steps), [r.tokens for r in results] == reference

    methods = {
        "greedy": plain_greedy,
        "greedy-hf": hf_greedy,
        "ppd-chain": lambda: ppd(None),
        "ppd-tree": lambda: ppd(choice.tree),
        "prompt-lookup": lambda: (prompt_lookup_acceptance(lm, prefixes, max_tokens, m), None),
    }
    seconds: dict[str, float] = {}
    cells: dict[str, dict] = {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, run in methods.items():
                start = time.perf_counter()
                per_forward, exact = run()
                seconds[name] = min(seconds.get(name, math.inf), time.perf_counter() - start)
                cells[name] = {"accepted_per_forward": per_forward, "matches_greedy": exact}
    tokens = max_tokens * len(prefixes)
    for name, cell in cells.items():
        cell["tokens_per_s"] = tokens / seconds[name]
        cell["speedup_vs_greedy"] = seconds["greedy"] / seconds[name]
        cell["accepted_ratio_vs_greedy"] = cell["accepted_per_forward"] / cells["greedy"]["accepted_per_forward"]
        print(
            f"{name:14s} {cell['tokens_per_s']:7.1f} tok/s ({cell['speedup_vs_greedy']:.2f}× greedy)  "
            f"{cell['accepted_per_forward']:.2f} tokens/forward ({cell['accepted_ratio_vs_greedy']:.2f}× greedy)"
            f"  same tokens as greedy: {cell['matches_greedy']}",
            flush=True,
        )
    print(
        f"ppd tree: {choice.nodes} nodes chosen from verification latency "
        + ", ".join(f"{n}: {s * 1e3:.1f} ms" for n, s in choice.latency.items()),
        flush=True,
    )
    return {
        "methods": cells,
        "tree_nodes": choice.nodes,
        "latency_ms": {str(n): s * 1e3 for n, s in choice.latency.items()},
        "expected_tokens_per_s": {str(n): v for n, v in choice.tokens_per_second.items()},
        "rank_acceptance": rates.tolist(),
        "config": {
            "prompt_tokens": m,
            "train_steps": train_steps,
            "prefixes": len(prefixes),
            "prefix_len": 32,
            "max_tokens": max_tokens,
            "repeats": repeats,
            "prompt_lookup_num_tokens": m,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=16384)
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-bytes rows")
    ap.add_argument("--kv-train-steps", type=int, default=40, help="MatryoshkaKV distillation steps")
    ap.add_argument("--no-ppd", action="store_true", help="skip the PPD decoding rows")
    ap.add_argument("--ppd-train-steps", type=int, default=150, help="PPD prompt-token training steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    top = 2048 if args.quick else args.max_length
    lengths = [1 << e for e in range(9 if args.quick else 10, int(math.log2(top)) + 1)]
    config = HyperConfig(block_size=128, sample_size=128, min_seq_len=512)
    hip_config = HiPConfig(top_k=512, block_q=64, block_k=2, window=256, sink=16)  # the reference code's v1.1 defaults
    methods = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "hyperattention": lambda q, k, v: hyper_attention(q, k, v, 64**-0.5, config),
        "hip": lambda q, k, v: hip_attention(q, k, v, 64**-0.5, hip_config),
        "hip-mask": lambda q, k, v: tree_search(q, k, hip_config),  # the tree search alone (claimed O(T log T))
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for length in lengths:
        q, k, v = random_qkv(length, heads=1, head_dim=64)
        row = {name: best_time(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), args.repeats) for name, fn in methods.items()}
        for name, seconds in row.items():
            times[name].append(seconds)
        print(
            f"T={length:6d}  "
            + "  ".join(f"{n} {s * 1e3:8.1f} ms ({s / row['sdpa']:.2f}× sdpa)" for n, s in row.items()),
            flush=True,
        )
    slopes = {name: loglog_slope(lengths, seconds) for name, seconds in times.items()}
    print("log-log slopes (time ∝ T^slope): " + ", ".join(f"{n} {s:.2f}" for n, s in slopes.items()))
    report = {
        "lengths": lengths,
        "seconds": times,
        "ratio_vs_sdpa": {n: [s / b for s, b in zip(v, times["sdpa"])] for n, v in times.items()},
        "slopes": slopes,
        "config": {
            "heads": 1,
            "head_dim": 64,
            "threads": 1,
            "repeats": args.repeats,
            "hyperattention": asdict(config),
            "hip": asdict(hip_config),
        },
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if not args.no_kv:
        report["kv"] = kv_rows(args.quick, 5 if args.quick else args.kv_train_steps)
    if not args.no_ppd:
        report["ppd"] = ppd_rows(args.quick, 30 if args.quick else args.ppd_train_steps, args.repeats)
    out = Path(__file__).parent / "results" / ("long-context-quick.json" if args.quick else "long-context.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
