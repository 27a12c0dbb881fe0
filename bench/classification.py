"""The classification kit's training overhead: `fit_classifier` against a plain PyTorch loop doing the same work.

Both train the same model from the same initial weights on digits with the same batch order and per-epoch
validation accuracy; the kit adds what a job needs (metric logging, progress, cancel checks per batch,
the loss/BatchLoss dispatch, optional checkpoints). Samples/s = epochs × train size / seconds; the kit's
overhead is the ratio plain/kit. Median of `--repeats` interleaved rounds after a warm-up round.

LP-ICP's prediction time (issue 10): the pruned search of `models.conformal.LabelPowersetICP.predict` against
brute force over all 2^L label sets (`predict_brute_force`, with the {0,1}^L matrix built once beforehand, so
only scoring is timed), on the same test examples and calibration set, as the label count L grows. The scores
are synthetic (true label probabilities π ~ Beta(0.3, 2), labels ~ Bernoulli(π), scorer outputs = π blurred on
the logit scale; 500 calibration examples, ε = 0.1), so L can go past the 40 labels of the reproduction's data.
Both are asked for the same sets (the bench checks they are identical); brute force stops at `--max-brute-labels`.

    .venv/bin/python bench/classification.py            # ~1 min on 2 busy cores
    .venv/bin/python bench/classification.py --quick    # tiny sizes, checks that it runs
    .venv/bin/python bench/classification.py --only lp-icp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.conformal import LabelPowersetICP, all_label_sets
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
        configs = {
            "plain loop": (plain_loop, 0),
            "kit": (kit_loop, 0),
            "kit + checkpoint every 5 epochs": (kit_loop, 5),
        }
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
        rows[backbone] = {
            name: {
                "seconds": median[name],
                "samples_per_s": samples / median[name],
                "overhead_vs_plain": median[name] / median["plain loop"],
                "all_seconds": times[name],
            }
            for name in configs
        }
    return rows


def synthetic_scores(rng: np.random.Generator, n: int, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    pi = rng.beta(0.3, 2.0, size=(n, num_labels))
    labels = (rng.random(pi.shape) < pi).astype(np.int8)
    logit = np.log(pi + 1e-6) - np.log1p(-pi + 1e-6) + 0.15 * rng.standard_normal(pi.shape)
    return 1 / (1 + np.exp(-logit)), labels


def lp_icp_timing(args: argparse.Namespace) -> list[dict]:
    """Per label count: mean ms per example and label sets scored, pruned vs brute force (same examples)."""
    rows = []
    for num_labels in args.label_counts:
        rng = np.random.default_rng(num_labels)
        icp = LabelPowersetICP.calibrate(*synthetic_scores(rng, 500, num_labels))
        test, _ = synthetic_scores(rng, args.lp_examples, num_labels)
        brute = num_labels <= args.max_brute_labels
        if brute:
            all_label_sets(num_labels)  # built once, outside the timing
        times: dict[str, list[float]] = {"pruned": [], "brute force": []}
        sizes, scored, identical = [], [], True
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            start = time.perf_counter()
            preds = [icp.predict(x, args.epsilon) for x in test]
            pruned_s = time.perf_counter() - start
            if brute:
                start = time.perf_counter()
                full = [icp.predict_brute_force(x, args.epsilon) for x in test]
                brute_s = time.perf_counter() - start
                identical &= all(a.same_as(b) for a, b in zip(preds, full))
            if round_:
                times["pruned"].append(pruned_s)
                if brute:
                    times["brute force"].append(brute_s)
            sizes, scored = [len(p) for p in preds], [p.evaluations for p in preds]
        pruned_ms = 1e3 * statistics.median(times["pruned"]) / len(test)
        row = {
            "labels": num_labels,
            "label_sets": 2.0**num_labels,
            "mean_set_size": float(np.mean(sizes)),
            "pruned_ms": pruned_ms,
            "pruned_scored": float(np.mean(scored)),
            "all_pruned_seconds": times["pruned"],
        }
        if brute:
            brute_ms = 1e3 * statistics.median(times["brute force"]) / len(test)
            row |= {
                "brute_force_ms": brute_ms,
                "brute_over_pruned_time": brute_ms / pruned_ms,
                "scored_fraction": row["pruned_scored"] / 2.0**num_labels,
                "identical_sets": identical,
                "all_brute_force_seconds": times["brute force"],
            }
        rows.append(row)
    return rows


def print_lp_icp(rows: list[dict]) -> None:
    print(
        f"\n{'labels':>6} {'set size':>9} {'pruned ms':>10} {'brute ms':>10} {'× time':>8} {'scored/2^L':>11} identical"
    )
    for r in rows:
        if "brute_force_ms" in r:
            print(
                f"{r['labels']:6d} {r['mean_set_size']:9.1f} {r['pruned_ms']:10.3f} {r['brute_force_ms']:10.3f} "
                f"{r['brute_over_pruned_time']:8.1f} {r['scored_fraction']:11.2e} {r['identical_sets']}"
            )
        else:
            print(
                f"{r['labels']:6d} {r['mean_set_size']:9.1f} {r['pruned_ms']:10.3f} {'—':>10} {'—':>8} "
                f"{r['pruned_scored'] / r['label_sets']:11.2e} (brute force not run)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat, LP-ICP up to 12 labels")
    parser.add_argument("--only", choices=("trainer", "lp-icp"), default=None, help="run one of the two benches")
    parser.add_argument("--label-counts", type=int, nargs="+", default=[4, 8, 12, 16, 20, 30, 40])
    parser.add_argument("--max-brute-labels", type=int, default=20, help="largest L brute force enumerates")
    parser.add_argument("--lp-examples", type=int, default=30, help="test examples per label count")
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.label_counts, args.lp_examples = 2, 1, [4, 8, 12], 10
    load = os.getloadavg()
    rows = measure(args) if args.only != "lp-icp" else {}
    if rows:
        print(f"{'backbone':8} {'loop':34} {'samples/s':>10} {'× plain time':>12}")
    for backbone, configs in rows.items():
        for name, r in configs.items():
            print(f"{backbone:8} {name:34} {r['samples_per_s']:10.0f} {r['overhead_vs_plain']:12.3f}")
    lp_rows = lp_icp_timing(args) if args.only != "trainer" else []
    if lp_rows:
        print_lp_icp(lp_rows)
    stem = "classification" + (f"-{args.only}" if args.only else "") + ("-quick" if args.quick else "")
    out = args.out or Path(__file__).parent / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "epochs": args.epochs,
                "repeats": args.repeats,
                "load_before": load,
                "load_after": os.getloadavg(),
                "torch": torch.__version__,
                "rows": rows,
                "lp_icp": {"epsilon": args.epsilon, "examples": args.lp_examples, "calibration": 500, "rows": lp_rows},
            },
            indent=2,
        )
    )
    print(f"load average before/after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}; written to {out}")


if __name__ == "__main__":
    main()
