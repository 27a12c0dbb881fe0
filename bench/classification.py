"""The classification kit's training overhead: `fit_classifier` against a plain PyTorch loop doing the same work.

Both train the same model from the same initial weights on digits with the same batch order and per-epoch
validation accuracy; the kit adds what a job needs (metric logging, progress, cancel checks per batch,
the loss/BatchLoss dispatch, optional checkpoints). Samples/s = epochs × train size / seconds; the kit's
overhead is the ratio plain/kit. Median of `--repeats` interleaved rounds after a warm-up round.

    .venv/bin/python bench/classification.py            # ~1 min on 2 busy cores
    .venv/bin/python bench/classification.py --quick    # tiny sizes, checks that it runs

LP-ICP's efficient-vs-brute-force timing (also asked for by issue 10) is not here: LP-ICP is not built yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.nn.backbones import build_backbone
from models.nn.losses import CrossEntropy
from models.training import SGDSchedule, accuracy, classification_data, fit_classifier


def plain_loop(model, data, schedule: SGDSchedule, seed: int) -> None:
    """The same work without the kit: SGD epochs in a seeded random order, val accuracy per epoch."""
    optimizer = schedule.optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(schedule.epochs):
        schedule.set_lr(optimizer, epoch)
        model.train()
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), schedule.batch_size):
            index = order[start : start + schedule.batch_size]
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy(model, data.x_val, data.y_val)


def kit_loop(model, data, schedule: SGDSchedule, seed: int) -> None:
    fit_classifier(InMemoryRunContext(seed=seed), model, CrossEntropy(), data, schedule)


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    data = classification_data(load_builtin("digits"))
    rows = {}
    for backbone, hidden in (("mlp", 128), ("cnn", 16)):
        torch.manual_seed(0)
        initial = build_backbone(backbone, data.input_shape, data.num_classes, hidden)
        configs = {"plain loop": (plain_loop, 0), "kit": (kit_loop, 0), "kit + checkpoint every 5 epochs": (kit_loop, 5)}
        times: dict[str, list[float]] = {name: [] for name in configs}
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            for name, (loop, every) in configs.items():
                schedule = SGDSchedule(args.epochs, 64, 0.05, checkpoint_every=every)
                model = copy.deepcopy(initial)
                start = time.perf_counter()
                loop(model, data, schedule, seed=0)
                if round_:
                    times[name].append(time.perf_counter() - start)
        samples = args.epochs * len(data.y_train)
        median = {name: statistics.median(t) for name, t in times.items()}
        rows[backbone] = {name: {"seconds": median[name], "samples_per_s": samples / median[name],
                                 "overhead_vs_plain": median[name] / median["plain loop"], "all_seconds": times[name]}
                          for name in configs}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats = 2, 1
    load = os.getloadavg()
    rows = measure(args)
    print(f"{'backbone':8} {'loop':34} {'samples/s':>10} {'× plain time':>12}")
    for backbone, configs in rows.items():
        for name, r in configs.items():
            print(f"{backbone:8} {name:34} {r['samples_per_s']:10.0f} {r['overhead_vs_plain']:12.3f}")
    out = args.out or Path(__file__).parent / "results" / ("classification-quick.json" if args.quick else "classification.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"epochs": args.epochs, "repeats": args.repeats, "load_before": load,
                               "load_after": os.getloadavg(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"load average before/after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}; written to {out}")


if __name__ == "__main__":
    main()
