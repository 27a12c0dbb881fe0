"""Memory-efficient optimizers against AdamW on the same model in the same run, and EES against exact
EigenScore as the number of samples grows.

    .venv/bin/python bench/optimizers.py [--quick]

Part 1: a micro Llama (d=64, 2 layers, vocab 512; `--size tiny` for d=128, 4 layers) on fixed random
token batches of 16×64. For each optimizer: optimizer-state bytes after 3 warm-up steps and the
median time of one full step (forward, backward, optimizer step) and of `optimizer.step()` alone,
arms interleaved round by round so machine load hits them alike; ratios against AdamW.
Part 2: exact ES (`slogdet` of the d×d matrix) vs EES (M=20 moments, 20 probes) at d=1024 for
K = 10…800 samples, with EES's relative error. One thread. Writes bench/results/optimizers.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.eigenscore import efficient_eigenscore, eigenscore
from models.llm.model import build_model, llama_config
from models.optim import build_optimizer, optimizer_state_bytes
from models.optim.sst import SSTAdam, to_sst

ARMS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: build_optimizer("adamw", m, lr=1e-3),
    "frugal-svd (ρ=0.25)": lambda m: build_optimizer("frugal", m, lr=1e-3, projection="svd", density=0.25),
    "frugal-block (ρ=0.25)": lambda m: build_optimizer("frugal", m, lr=1e-3, projection="block", density=0.25),
    "galore-adamw (ρ=0.25)": lambda m: build_optimizer("galore-adamw", m, lr=1e-3, density=0.25),
    "stable-spam": lambda m: build_optimizer("stable-spam", m, lr=1e-3),
    "sst (r=d/8)": lambda m: SSTAdam.for_model(to_sst(m), lr=1e-3, rank=m.config.hidden_size // 8),
}


class Arm:
    def __init__(self, name: str, size: str, batches: list[torch.Tensor]):
        self.name, self.batches, self.i = name, batches, 0
        self.model = build_model(llama_config(size, 512), seed=0)
        self.opt = ARMS[name](self.model)  # SST swaps the linear layers in place
        self.full: list[float] = []
        self.opt_only: list[float] = []

    def step(self, record: bool) -> None:
        ids = self.batches[self.i % len(self.batches)]
        self.i += 1
        start = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        mid = time.perf_counter()
        self.opt.step()
        end = time.perf_counter()
        if record:
            self.full.append(end - start)
            self.opt_only.append(end - mid)


def bench_optimizers(size: str, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (16, 64), generator=g) for _ in range(4)]
    arms = [Arm(name, size, batches) for name in ARMS]
    for arm in arms:
        for _ in range(3):
            arm.step(record=False)
    for _ in range(rounds):
        for arm in arms:
            arm.step(record=True)
    base = arms[0]
    base_bytes, base_full, base_opt = (
        optimizer_state_bytes(base.opt),
        statistics.median(base.full),
        statistics.median(base.opt_only),
    )
    rows = []
    for arm in arms:
        state, full, opt_only = (
            optimizer_state_bytes(arm.opt),
            statistics.median(arm.full),
            statistics.median(arm.opt_only),
        )
        rows.append(
            {
                "optimizer": arm.name,
                "state_bytes": state,
                "state_vs_adamw": state / base_bytes,
                "step_s": full,
                "step_vs_adamw": full / base_full,
                "opt_step_s": opt_only,
                "opt_step_vs_adamw": opt_only / base_opt,
            }
        )
    return rows


def timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    value = fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), value


def bench_eigenscore(d: int, samples: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    for k in samples:
        g = torch.Generator().manual_seed(k)
        z = torch.randn(k, d, generator=g)
        exact_s, exact = timed(lambda z=z: eigenscore(z, 1.0), repeats)
        ees_s, ees = timed(lambda z=z: efficient_eigenscore(z, 1.0, 20, 20, torch.Generator().manual_seed(0)), repeats)
        rows.append(
            {
                "d": d,
                "samples": k,
                "exact_s": exact_s,
                "ees_s": ees_s,
                "speedup": exact_s / ees_s,
                "relative_error": abs(ees - exact) / abs(exact),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", default="micro", choices=["micro", "tiny"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 2 if args.quick else args.rounds
    opt_rows = bench_optimizers(args.size, rounds)
    print(
        f"{'optimizer':24} {'state KiB':>10} {'×AdamW':>7} {'step ms':>8} {'×AdamW':>7} "
        f"{'opt.step ms':>12} {'×AdamW':>7}"
    )
    for r in opt_rows:
        print(
            f"{r['optimizer']:24} {r['state_bytes'] / 1024:10.1f} {r['state_vs_adamw']:7.2f} {r['step_s'] * 1e3:8.1f} "
            f"{r['step_vs_adamw']:7.2f} {r['opt_step_s'] * 1e3:12.2f} {r['opt_step_vs_adamw']:7.2f}"
        )
    es_rows = bench_eigenscore(
        256 if args.quick else 1024, (10, 50) if args.quick else (10, 50, 200, 800), 1 if args.quick else 3
    )
    print(f"\n{'d':>5} {'K':>5} {'exact ms':>9} {'EES ms':>8} {'speed-up':>9} {'EES rel. err':>13}")
    for r in es_rows:
        print(
            f"{r['d']:5d} {r['samples']:5d} {r['exact_s'] * 1e3:9.2f} {r['ees_s'] * 1e3:8.2f} {r['speedup']:9.2f} "
            f"{r['relative_error']:13.3%}"
        )
    out = Path(__file__).parent / "results" / ("optimizers-quick.json" if args.quick else "optimizers.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": args.size,
                "rounds": rounds,
                "optimizers": opt_rows,
                "eigenscore": es_rows,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
