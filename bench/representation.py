"""Representation kit: contrastive-loss throughput against pytorch-metric-learning, and the evaluation
job's time on 10k embeddings.

    .venv/bin/python bench/representation.py [--quick]

Each figure is the median of `--repeats` timed rounds after a warm-up, ours and PML interleaved so
machine load hits both alike; one thread. Prints a table and writes bench/results/representation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.losses import NTXentLoss, SupConLoss

from models.representation.evaluation import evaluate_embeddings, rankme
from models.representation.losses import multi_positive_info_nce, nt_xent


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def loss_step(loss_fn, *tensors):
    def step():
        leaves = [t.detach().requires_grad_() for t in tensors[:2]]
        loss_fn(*leaves, *tensors[2:]).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for batch in (64,) if args.quick else (128, 256):
        z1, z2 = torch.randn(batch, 128), torch.randn(batch, 128)
        labels = torch.arange(batch).repeat(2)
        pml = NTXentLoss(temperature=0.5)
        ours = timed(loss_step(lambda a, b: nt_xent(a, b, 0.5), z1, z2), args.repeats)
        theirs = timed(
            loss_step(lambda a, b, pml=pml, labels=labels: pml(torch.cat([a, b]), labels), z1, z2), args.repeats
        )
        rows.append({"loss": "NT-Xent fwd+bwd", "batch": batch, "ours_s": ours, "pml_s": theirs})
        y = torch.randint(0, 10, (batch,))
        y2 = torch.cat([y, y])
        supcon = SupConLoss(temperature=0.1)

        def ours_multi(a, b, batch=batch, y2=y2):
            z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
            eye = torch.eye(2 * batch, dtype=torch.bool)
            same = (y2[:, None] == y2[None]) & ~eye
            return multi_positive_info_nce(z @ z.T / 0.1, same, ~same & ~eye)

        ours = timed(loss_step(ours_multi, z1, z2), args.repeats)
        theirs = timed(
            loss_step(lambda a, b, supcon=supcon, y2=y2: supcon(torch.cat([a, b]), y2), z1, z2), args.repeats
        )
        rows.append(
            {"loss": "multi-positive (Hydra form) vs PML SupCon", "batch": batch, "ours_s": ours, "pml_s": theirs}
        )
    n = 1000 if args.quick else 10_000
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    z = rng.normal(size=(10, 64))[y] + rng.normal(size=(n, 64))
    start = time.perf_counter()
    evaluate_embeddings(z[: n // 2], y[: n // 2], z[n // 2 :], y[n // 2 :])
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    rankme(torch.from_numpy(z))
    rankme_s = time.perf_counter() - start
    print(f"{'loss':45s} {'batch':>6s} {'ours ms':>9s} {'PML ms':>9s} {'PML/ours':>9s}")
    for r in rows:
        print(
            f"{r['loss']:45s} {r['batch']:6d} {1e3 * r['ours_s']:9.2f} {1e3 * r['pml_s']:9.2f} "
            f"{r['pml_s'] / r['ours_s']:9.2f}"
        )
    print(f"evaluation suite on {n} embeddings (half train, half test): {eval_s:.2f} s; RankMe alone {rankme_s:.3f} s")
    out = Path(__file__).parent / "results" / ("representation-quick.json" if args.quick else "representation.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "losses": rows,
                "evaluation_s": eval_s,
                "rankme_s": rankme_s,
                "embeddings": n,
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
