"""One causal attention layer's time against sequence length on CPU, one thread: exact SDPA (torch's fused
kernel) and HyperAttention (`models/llm/attention/hyperattention.py`, the notes' b = m = 128, min_seq_len 512,
7 hyperplanes) and HiP (`models/llm/attention/hip.py`, the notes' v1.1 defaults k = 512, b_q = 64,
b_k = 2, window 256, 16 sinks), with the log-log slope of time vs T fitted per method (2 = quadratic,
≈1 = near-linear) and each time printed as a ratio against SDPA
(`hip-mask` is HiP's tree search alone), measured in the same run at the same length.

One head of width 64, Gaussian q/k/v (content does not change the cost); the fastest of `--repeats` calls.

    .venv/bin/python bench/long_context.py            # 1k..16k, ~1-2 min on a busy core
    .venv/bin/python bench/long_context.py --quick    # 512..2k, seconds
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=16384)
    args = ap.parse_args()
    torch.set_num_threads(1)
    top = 2048 if args.quick else args.max_length
    lengths = [1 << e for e in range(9 if args.quick else 10, int(math.log2(top)) + 1)]
    config = HyperConfig(block_size=128, sample_size=128, min_seq_len=512)
    hip_config = HiPConfig(top_k=512, block_q=64, block_k=2, window=256, sink=16)  # the notes' v1.1 defaults
    methods = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "hyperattention": lambda q, k, v: hyper_attention(q, k, v, 64 ** -0.5, config),
        "hip": lambda q, k, v: hip_attention(q, k, v, 64 ** -0.5, hip_config),
        "hip-mask": lambda q, k, v: tree_search(q, k, hip_config),  # the tree search alone (claimed O(T log T))
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for length in lengths:
        q, k, v = random_qkv(length, heads=1, head_dim=64)
        row = {name: best_time(lambda fn=fn: fn(q, k, v), args.repeats) for name, fn in methods.items()}
        for name, seconds in row.items():
            times[name].append(seconds)
        print(f"T={length:6d}  " + "  ".join(f"{n} {s * 1e3:8.1f} ms ({s / row['sdpa']:.2f}× sdpa)"
                                              for n, s in row.items()), flush=True)
    slopes = {name: loglog_slope(lengths, seconds) for name, seconds in times.items()}
    print("log-log slopes (time ∝ T^slope): " + ", ".join(f"{n} {s:.2f}" for n, s in slopes.items()))
    report = {"lengths": lengths, "seconds": times, "ratio_vs_sdpa": {n: [s / b for s, b in zip(v, times["sdpa"])]
                                                                      for n, v in times.items()},
              "slopes": slopes, "config": {"heads": 1, "head_dim": 64, "threads": 1, "repeats": args.repeats,
                                           "hyperattention": asdict(config), "hip": asdict(hip_config)},
              "torch": torch.__version__, "machine": platform.machine()}
    out = Path(__file__).parent / "results" / ("long-context-quick.json" if args.quick else "long-context.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
