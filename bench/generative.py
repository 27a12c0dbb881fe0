"""The generative family's costs, each against its peer in the same run:

- lossless coding: decode throughput (images/s) of the HCLT with path-only vs naive conditionals at D = 64 and 256,
  and against the MADE codec (same ANS coder) and zlib's decompressor, with each codec's bits/dim alongside;
- neural fields: forward + backward throughput (rays/s) of the MLP, dense-grid and hash-grid radiance fields on
  one batch of rays through the volume renderer;
- CAM: time per full-batch iteration over the Fourier-feature MLP's (128² photo, stride-2 pixels).

Models are trained briefly where bits/dim is reported (throughput does not depend on the weights); the decode
comparisons use the same images for every codec. Median of `--repeats` rounds after a warm-up, one thread.

    .venv/bin/python bench/generative.py            # ~3-5 min on 2 busy cores
    .venv/bin/python bench/generative.py --quick    # tiny sizes, checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.compression import ans
from models.compression.baselines import train_made
from models.compression.chow_liu import chow_liu_tree
from models.compression.conditionals import ConditionalEvaluator
from models.compression.data import discrete_images
from models.compression.em import EMSchedule, fit_hclt
from models.compression.hclt import HCLT
from models.context import InMemoryRunContext
from models.fields.images import sample_image_field
from models.fields.radiance import dense_field, hash_field, mlp_field
from models.fields.rendering import Rays
from models.fields.scene import render, scene_views
from models.methods.generative.cam_fields import CAMParams, CoordinateMLP


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_coding(side: int, images: int, quick: bool, repeats: int) -> dict:
    data = discrete_images(side=side)
    x = data.test[:images]
    ctx = InMemoryRunContext()
    tree = chow_liu_tree(data.train, data.levels)
    start = HCLT.random(tree, 16, data.levels, torch.Generator().manual_seed(0))
    hclt = fit_hclt(ctx, start, data.train, EMSchedule(epochs=2 if quick else 10), seed=0)
    made = train_made(ctx, data.train, data.levels, seed=0, epochs=1 if quick else 10)
    row: dict[str, dict[str, float]] = {}
    for name, model, log_p in (
        ("hclt path-only", ConditionalEvaluator(hclt, "path"), hclt.log_likelihood(x)),
        ("hclt naive", ConditionalEvaluator(hclt, "naive"), hclt.log_likelihood(x)),
        ("made", made, made.log_likelihood(x).detach().double()),
    ):
        with torch.no_grad():
            words = ans.encode(model, x)
            seconds = median_seconds(lambda m=model, w=words: ans.decode(m, w, *x.shape), repeats)
        row[name] = {
            "decode_images_per_s": len(x) / seconds,
            "bits_per_dim": 32 * len(words) / x.numel(),
            "theoretical_bits_per_dim": ans.nats_to_bits(-float(log_p.sum())) / x.numel(),
        }
    raw = x.numpy().astype(np.uint8).tobytes()
    packed = zlib.compress(raw, 9)
    row["zlib"] = {
        "decode_images_per_s": len(x) / median_seconds(lambda: zlib.decompress(packed), repeats),
        "bits_per_dim": 8 * len(packed) / x.numel(),
    }
    path = row["hclt path-only"]["decode_images_per_s"]
    return {
        "pixels": data.num_pixels,
        "images": len(x),
        "codecs": row,
        "path_over_naive": path / row["hclt naive"]["decode_images_per_s"],
        "path_over_made": path / row["made"]["decode_images_per_s"],
        "path_over_zlib": path / row["zlib"]["decode_images_per_s"],
    }


def bench_fields(rays_count: int, samples: int, repeats: int) -> dict:
    views = scene_views()
    rays, colours = views.rays(views.train)
    batch, target = Rays(rays.origins[:rays_count], rays.directions[:rays_count]), colours[:rays_count]
    torch.manual_seed(0)
    fields = {
        "mlp": mlp_field(),
        "dense grid": dense_field(torch.Generator().manual_seed(0)),
        "hash grid": hash_field(torch.Generator().manual_seed(0)),
    }
    out = {}
    for name, field in fields.items():

        def step(f=field) -> None:
            loss = F.mse_loss(render(lambda p: f(p, False), batch, samples, torch.Generator().manual_seed(0)), target)
            loss.backward()

        out[name] = rays_count / median_seconds(step, repeats)
    return {"rays_per_s": out, "rays": rays_count, "samples": samples, "hash_over_mlp": out["hash grid"] / out["mlp"]}


def bench_cam(size: int, repeats: int) -> dict:
    image = sample_image_field("china.jpg", size)
    params = CAMParams(size=size)
    out = {}
    for variant in ("ffn", "cam"):
        model = CoordinateMLP(
            variant,
            torch.Generator().manual_seed(0),
            params.hidden,
            params.layers,
            params.frequencies,
            params.sigma,
            params.grid_resolution,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def iteration(m=model, o=optimizer) -> None:
            loss = F.mse_loss(m(image.train_coords), image.train_colours)
            o.zero_grad()
            loss.backward()
            o.step()

        out[variant] = median_seconds(lambda it=iteration: [it() for _ in range(10)], repeats) / 10
    return {"seconds_per_iteration": out, "cam_over_ffn_time": out["cam"] / out["ffn"], "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    report: dict = {"load_average_before": os.getloadavg()}
    coding = []
    for side, images in ((8, 64 if args.quick else 360), (16, 16 if args.quick else 64)):
        print(f"coding D = {side * side} …", file=sys.stderr, flush=True)
        coding.append(bench_coding(side, images, args.quick, repeats))
    report["coding"] = coding
    print("fields …", file=sys.stderr, flush=True)
    report["fields"] = bench_fields(256 if args.quick else 1024, 16 if args.quick else 32, repeats)
    print("cam …", file=sys.stderr, flush=True)
    report["cam"] = bench_cam(32 if args.quick else 128, repeats)
    report["load_average_after"] = os.getloadavg()
    for row in coding:
        print(f"D = {row['pixels']} ({row['images']} images)    decode images/s   bits/dim")
        for name, r in row["codecs"].items():
            print(f"  {name:<16}{r['decode_images_per_s']:>14.1f}{r['bits_per_dim']:>11.3f}")
        print(
            f"  path-only ÷ naive {row['path_over_naive']:.2f}×, ÷ MADE {row['path_over_made']:.2f}×, "
            f"÷ zlib {row['path_over_zlib']:.4f}×"
        )
    f = report["fields"]
    print(
        f"fields, forward+backward, {f['rays']} rays × {f['samples']} samples: "
        + ", ".join(f"{k} {v:,.0f} rays/s" for k, v in f["rays_per_s"].items())
        + f" (hash ÷ MLP {f['hash_over_mlp']:.2f}×)"
    )
    c = report["cam"]
    print(
        f"CAM {c['seconds_per_iteration']['cam'] * 1e3:.1f} ms/iteration vs FFN "
        f"{c['seconds_per_iteration']['ffn'] * 1e3:.1f} ms ({c['cam_over_ffn_time']:.2f}× the time), {c['size']}² photo"
    )
    out = Path(__file__).parent / "results" / ("generative-quick.json" if args.quick else "generative.json")
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
