"""One causal attention layer's time and peak memory against sequence length on CPU, one thread, 4 heads × 64:
exact SDPA (torch's fused flash kernel) against HiP and HyperAttention on their new tiled path (the default;
`models/llm/attention/flex.py`: HiP on FlexAttention, HyperAttention's dense tiles on SDPA's fused CPU kernel, and
forced onto FlexAttention as `hyperattention-flex`) and on their old pure-torch path (`-old`), each time printed
as a ratio of SDPA's time over the method's measured in the same run at the same length (> 1: faster than SDPA),
with the log-log slope of time vs T per method (2 = quadratic, ≈1 = near-linear) and HiP's tree search's share
of HiP's time.

Configurations: HyperAttention at its reproduction's timing budget (b = m = 128, min_seq_len 512, 7 hyperplanes
— the paper's code defaults); HiP at its reproduction's budget (`hip`: k = 32, b_q = 16, b_k = 2, window 16,
4 sinks) and at the reference code's v1.1 defaults (`hip-k512`: k = 512, b_q = 64, b_k = 2, window 256, 16 sinks).
Gaussian q/k/v (content does not change the cost). Each cell: one untimed call (it compiles FlexAttention's
kernels), the fastest of `--repeats` timed calls, and the peak memory of one call measured in a fresh process
(`--peak`: the same inputs and one untimed call first; the peak resident memory above what was resident before
the call, read from the kernel: VmHWM after `clear_refs`, freed heap returned first) — a long-lived process's
heap, fragmented by the cells before, would add to it. A method is
skipped at a length where its memory, extrapolated from the previous length at the slope measured there (at
least linear), would not fit in the available memory, and the old paths stop at `--old-max-length`.

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
tokens/s and generated tokens per forward, printed as ratios against greedy decoding. A section skipped with
`--no-kv` / `--no-ppd` keeps the previous run's rows in the results file (marked `"kept_from_previous_run"`).

    .venv/bin/python bench/long_context.py --max-length 65536 --no-kv --no-ppd   # the attention rows, 1k..64k
    .venv/bin/python bench/long_context.py            # 1k..16k, then the KV and PPD rows
    .venv/bin/python bench/long_context.py --quick    # 512..2k, seconds; fewer KV windows
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from models.llm.attention.hip import HiPConfig, hip_attention, tree_search
from models.llm.attention.hyperattention import HyperConfig, hyper_attention
from models.llm.attention.measure import best_time, random_qkv

HEADS, HEAD_DIM = 4, 64
HYPER = HyperConfig(block_size=128, sample_size=128, min_seq_len=512)  # the reproduction's timing budget
HIP = HiPConfig(top_k=32, block_q=16, block_k=2, window=16, sink=4)  # the reproduction's budget
HIP_K512 = HiPConfig(top_k=512, block_q=64, block_k=2, window=256, sink=16)  # the reference code's v1.1 defaults
SCALE = HEAD_DIM**-0.5
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
METHODS: dict[str, Attention] = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "hip": lambda q, k, v: hip_attention(q, k, v, SCALE, HIP, path="flex"),
    "hip-old": lambda q, k, v: hip_attention(q, k, v, SCALE, HIP, path="gather"),
    "hip-search": lambda q, k, v: tree_search(q, k, HIP),  # step 1 alone (its share of `hip`)
    "hip-k512": lambda q, k, v: hip_attention(q, k, v, SCALE, HIP_K512, path="flex"),
    "hip-k512-old": lambda q, k, v: hip_attention(q, k, v, SCALE, HIP_K512, path="gather"),
    "hip-k512-search": lambda q, k, v: tree_search(q, k, HIP_K512),
    "hyperattention": lambda q, k, v: hyper_attention(q, k, v, SCALE, HYPER),  # the default: SDPA's kernel on tiles
    "hyperattention-flex": lambda q, k, v: hyper_attention(q, k, v, SCALE, HYPER, path="flex"),
    "hyperattention-old": lambda q, k, v: hyper_attention(q, k, v, SCALE, HYPER, path="gather"),
}


def loglog_slope(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) on log(T)."""
    xs, ys = [math.log(t) for t in lengths], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


@torch.no_grad()
def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory of one call above what was resident before it: garbage collected and glibc's freed
    heap returned to the kernel first (else the call reuses it unseen), the peak mark reset (`clear_refs` 5)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)


def peak_in_fresh_process(name: str, length: int) -> int:
    """`python bench/long_context.py --peak NAME LENGTH`: the peak bytes of one call of method NAME."""
    command = [sys.executable, __file__, "--peak", name, str(length)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def fits(previous: dict) -> bool:
    """Whether a method's next length (twice the previous) fits in 80% of the available memory, its peak
    extrapolated at the growth measured at the previous length (at least linear)."""
    if not previous.get("peak_bytes"):
        return True
    return previous["peak_bytes"] * 2 ** max(1.0, previous.get("mem_slope", 1.0)) < 0.8 * available_bytes()


def measure(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int, previous: dict) -> dict:
    """One untimed call (FlexAttention compiles its kernels for the shape), the fastest of `repeats` calls, and the
    peak memory of one call in a fresh process (`peak_in_fresh_process`); the memory's log₂ growth since the
    previous length."""

    def call() -> object:
        return METHODS[name](q, k, v)

    with torch.no_grad():
        call()
    cell = {"seconds": best_time(call, repeats), "peak_bytes": peak_in_fresh_process(name, q.shape[-2])}
    if previous.get("peak_bytes"):
        cell["mem_slope"] = math.log2(max(cell["peak_bytes"], 1) / previous["peak_bytes"])
    return cell


def attention_rows(lengths: list[int], repeats: int, old_max_length: int) -> dict:
    """Time and peak memory of every method at every length (module docstring), with the skips and why."""
    rows: dict[str, dict[str, dict]] = {name: {} for name in METHODS}
    for length in lengths:
        q, k, v = random_qkv(length, heads=HEADS, head_dim=HEAD_DIM)
        line = []
        for name in METHODS:
            cell: dict = {}
            previous = rows[name].get(str(length // 2), {})
            if "old" in name and length > old_max_length:
                cell["skipped"] = f"old path above --old-max-length {old_max_length}"
            elif not fits(previous):
                cell["skipped"] = "would not fit in the available memory"
            else:
                cell = measure(name, q, k, v, repeats, previous)
            rows[name][str(length)] = cell
        sdpa = rows["sdpa"][str(length)].get("seconds")
        for name in METHODS:
            cell = rows[name][str(length)]
            if sdpa and "seconds" in cell:
                cell["speedup_vs_sdpa"] = sdpa / cell["seconds"]  # > 1: faster than SDPA
            line.append(
                f"{name} {cell['seconds'] * 1e3:.0f} ms ({cell.get('speedup_vs_sdpa', math.nan):.2f}×, "
                f"{cell['peak_bytes'] / 2**20:.0f} MiB)"
                if "seconds" in cell
                else f"{name} skipped"
            )
        print(f"T={length:6d}  " + "  ".join(line), flush=True)
    for base in ("hip", "hip-k512"):
        for length, cell in rows[base].items():
            search = rows[f"{base}-search"][length]
            if "seconds" in cell and "seconds" in search:
                cell["search_share"] = search["seconds"] / cell["seconds"]
    slopes = {}
    for name, cells in rows.items():
        timed = [(int(t), c["seconds"]) for t, c in cells.items() if "seconds" in c]
        if len(timed) >= 2:
            slopes[name] = loglog_slope([t for t, _ in timed], [s for _, s in timed])
    print("log-log slopes (time ∝ T^slope): " + ", ".join(f"{n} {s:.2f}" for n, s in slopes.items()))
    return {
        "lengths": lengths,
        "rows": rows,
        "slopes": slopes,
        "config": {
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "old_max_length": old_max_length,
            "hyperattention": asdict(HYPER),
            "hip": asdict(HIP),
            "hip-k512": asdict(HIP_K512),
        },
    }


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
    ap.add_argument("--old-max-length", type=int, default=32768, help="longest length for the old pure-torch paths")
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-bytes rows")
    ap.add_argument("--kv-train-steps", type=int, default=40, help="MatryoshkaKV distillation steps")
    ap.add_argument("--no-ppd", action="store_true", help="skip the PPD decoding rows")
    ap.add_argument("--ppd-train-steps", type=int, default=150, help="PPD prompt-token training steps")
    ap.add_argument("--peak", nargs=2, metavar=("METHOD", "LENGTH"), help="print one call's peak bytes and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peak:
        q, k, v = random_qkv(int(args.peak[1]), heads=HEADS, head_dim=HEAD_DIM)
        fn = METHODS[args.peak[0]]
        if args.peak[0] != "sdpa":  # no kernels to compile: spare the longest call
            with torch.no_grad():
                fn(q, k, v)
        print(peak_bytes(lambda: fn(q, k, v)))
        return
    top = 2048 if args.quick else args.max_length
    lengths = [1 << e for e in range(9 if args.quick else 10, int(math.log2(top)) + 1)]
    out = Path(__file__).parent / "results" / ("long-context-quick.json" if args.quick else "long-context.json")
    previous = json.loads(out.read_text()) if out.exists() else {}
    report = {
        "attention": attention_rows(lengths, args.repeats, args.old_max_length),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    for section, skip, run in (
        ("kv", args.no_kv, lambda: kv_rows(args.quick, 5 if args.quick else args.kv_train_steps)),
        ("ppd", args.no_ppd, lambda: ppd_rows(args.quick, 30 if args.quick else args.ppd_train_steps, args.repeats)),
    ):
        if not skip:
            report[section] = run()
        elif section in previous:
            report[section] = previous[section] | {"kept_from_previous_run": True}
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
