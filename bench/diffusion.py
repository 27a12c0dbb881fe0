"""The sampling core's throughput: images/s for no guidance, CFG and APG on the same model and
sampler (APG's overhead over CFG as a ratio; the APG paper calls it negligible), and our core
against a loop built only from diffusers pieces — the same UNet, `DDIMScheduler` and diffusers'
own `ClassifierFreeGuidance` / `AdaptiveProjectedGuidance` guiders applied to ε, as diffusers'
pipelines do — with the largest difference between the two CFG outputs as a parity check.

Throughput does not depend on the weights, so the U-Net is the base model's architecture
(`FULL_CONFIG.widths`, ~1M parameters) freshly initialised: the bench never trains anything.
Median of `--repeats` interleaved rounds after a warm-up round, one thread.

    .venv/bin/python bench/diffusion.py            # ~2-4 min on 2 busy cores
    .venv/bin/python bench/diffusion.py --quick    # tiny sizes, checks that it runs

PCPP's bytes and wall-clock are not here: PCPP is not built yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import DiffusionParts, new_parts
from models.diffusion.sampling import SampleRequest, initial_noise, make_scheduler, sample
from models.diffusion.training import FULL_CONFIG


@torch.no_grad()
def diffusers_loop(parts: DiffusionParts, guider, n: int, steps: int, seed: int, prompt: list[int]) -> torch.Tensor:
    """DDIM + a diffusers guider on ε (the stock pipelines' order of operations)."""
    scheduler = make_scheduler(parts, "ddim")
    assert isinstance(scheduler, DDIMScheduler)
    scheduler.set_timesteps(steps)
    x = initial_noise([seed + i for i in range(n)], (3, 16, 16))
    emb = parts.encode(torch.tensor([prompt, parts.prompt_encoder.null_tokens]))
    cond = torch.cat([emb[:1].expand(n, -1, -1), emb[1:].expand(n, -1, -1)])
    if isinstance(guider, AdaptiveProjectedGuidance):
        guider.momentum_buffer = MomentumBuffer(guider.adaptive_projected_guidance_momentum)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        eps_c, eps_u = parts.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
        x = scheduler.step(guider.forward(eps_c, eps_u).pred, t, x).prev_sample
    return x


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pcpp(quick: bool) -> dict:
    """Patch parallelism of the mini-DiT (models/diffusion/patch_parallel.py): measured at N = 2 processes
    (gloo on this machine: wall-clock with process start, K/V bytes received) for full sync, DistriFusion and
    PCPP against one process; N = 2, 4, 8 *modelled* per step from the measured single-process step time and
    the counted bytes at two assumed link bandwidths (this machine has 2 cores, so N > 2 cannot be measured).
    Fidelity is not measured here: a fresh adaLN-Zero DiT's blocks start as the identity, so every mode draws
    the same images; the `pcpp` reproduction measures PSNR on the trained one. At N = 2 a strip's only
    neighbour is every other strip, so PCPP receives what DistriFusion does; its saving starts at N = 4."""
    from models.diffusion.dit import DiTConfig, MiniDiT
    from models.diffusion.patch_parallel import ParallelSpec, expected_kv_bytes, sample_parallel, sample_single

    config = DiTConfig(width=32, depth=2) if quick else DiTConfig()
    torch.manual_seed(0)
    model = MiniDiT(config).eval()  # bytes and time do not depend on the weights
    batch, steps = (4, 4) if quick else (32, 20)
    labels, seeds = torch.arange(batch) % 10, list(range(batch))
    sample_single(model, labels, seeds, 1)  # warm-up
    single = timed(lambda: sample_single(model, labels, seeds, steps))
    measured = {"single_s": single}
    for mode in ("sync", "distrifusion", "pcpp"):
        spec = ParallelSpec(mode=mode, world=2, steps=steps, warmup=1)
        start = time.perf_counter()
        result = sample_parallel(model, spec, labels, seeds)
        measured[mode] = {
            "wall_s": time.perf_counter() - start,
            "kv_bytes": result.kv_bytes,
            "eps_bytes": result.eps_bytes,
            "ranks_agree": result.agree,
        }
    step_s = single / steps
    eps_per_rank = batch * 3 * 16 * 16 * 4  # one ε strip set: each rank receives (N−1)/N of the image per step
    modelled = {}
    for bandwidth_name, bandwidth in (("25 GB/s (NVLink-class)", 25e9), ("3 GB/s (PCIe/Ethernet-class)", 3e9)):
        for world in (2, 4, 8):
            row = {}
            for mode in ("sync", "distrifusion", "pcpp"):
                spec = ParallelSpec(mode=mode, world=world, steps=steps, warmup=1)
                per_rank = (
                    expected_kv_bytes(spec, batch, config) / world + eps_per_rank * (world - 1) / world * steps
                ) / steps
                compute, comm = step_s / world, per_rank / bandwidth
                # sync waits for its exchange; DistriFusion and PCPP overlap it with the next step's compute
                row[mode] = step_s / (compute + comm if mode == "sync" else max(compute, comm))
            modelled[f"{bandwidth_name}, N={world}"] = row
    return {
        "batch": batch,
        "steps": steps,
        "dit": {"width": config.width, "depth": config.depth},
        "measured_n2": measured,
        "modelled_speedup_vs_one_process": modelled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, steps, widths = (4, 3, (8, 16)) if args.quick else (64, 20, FULL_CONFIG.widths)
    torch.manual_seed(0)
    parts = new_parts(widths).eval()
    prompt, w = [3, None, None], 6.0
    rules = {
        "none": GuidanceSpec("none"),
        "cfg": GuidanceSpec("cfg", w),
        "apg": GuidanceSpec("apg", w, eta=0.0, norm_threshold=2.0, momentum=-0.5),
    }
    ours = {
        name: (lambda g=g: sample(parts, SampleRequest(prompt=prompt, guidance=g, steps=steps, n=n)))
        for name, g in rules.items()
    }
    theirs = {
        "diffusers-cfg": lambda: diffusers_loop(
            parts, ClassifierFreeGuidance(guidance_scale=w), n, steps, 0, [3, 6, 3]
        ),
        "diffusers-apg": lambda: diffusers_loop(
            parts,
            AdaptiveProjectedGuidance(
                guidance_scale=w,
                adaptive_projected_guidance_momentum=-0.5,
                adaptive_projected_guidance_rescale=2.0,
                eta=0.0,
            ),
            n,
            steps,
            0,
            [3, 6, 3],
        ),
    }
    arms = {**ours, **theirs}
    for fn in arms.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeats):
        for name, fn in arms.items():
            seconds[name].append(timed(fn))
        print(f"round {r + 1}/{args.repeats} done", flush=True, file=__import__("sys").stderr)
    ips = {k: n / statistics.median(v) for k, v in seconds.items()}
    ref = sample(parts, SampleRequest(prompt=prompt, guidance=rules["cfg"], steps=steps, n=n)).raw
    parity = (diffusers_loop(parts, ClassifierFreeGuidance(guidance_scale=w), n, steps, 0, [3, 6, 3]) - ref).abs().max()
    report = {
        "images_per_s": ips,
        "seconds": seconds,
        "n": n,
        "steps": steps,
        "widths": list(widths),
        "apg_over_cfg_time": ips["cfg"] / ips["apg"],
        "cfg_over_none_time": ips["none"] / ips["cfg"],
        "ours_cfg_over_diffusers_cfg_time": ips["diffusers-cfg"] / ips["cfg"],
        "ours_apg_over_diffusers_apg_time": ips["diffusers-apg"] / ips["apg"],
        "cfg_max_abs_diff_vs_diffusers": parity.item(),
        "load_average": os.getloadavg(),
    }
    print(f"{'arm':<16}{'images/s':>10}")
    for k, v in ips.items():
        print(f"{k:<16}{v:>10.1f}")
    print(
        f"APG/CFG time {report['apg_over_cfg_time']:.3f}; CFG/none time {report['cfg_over_none_time']:.2f}; "
        f"ours/diffusers time: CFG {report['ours_cfg_over_diffusers_cfg_time']:.3f}, "
        f"APG {report['ours_apg_over_diffusers_apg_time']:.3f}; CFG output max |diff| vs diffusers "
        f"{report['cfg_max_abs_diff_vs_diffusers']:.2e}"
    )
    report["pcpp"] = pcpp = bench_pcpp(args.quick)
    m = pcpp["measured_n2"]
    print(
        f"patch parallelism, N=2 measured ({pcpp['batch']} images, {pcpp['steps']} steps; wall-clock includes "
        f"process start): one process {m['single_s']:.2f}s"
    )
    for mode in ("sync", "distrifusion", "pcpp"):
        print(
            f"  {mode:<13}{m[mode]['wall_s']:>7.2f}s  K/V received {m[mode]['kv_bytes'] / 1e6:>8.1f} MB  "
            f"(÷ DistriFusion {m[mode]['kv_bytes'] / m['distrifusion']['kv_bytes']:.2f})  "
            f"ranks agree {m[mode]['ranks_agree']}"
        )
    print("  modelled speed-up over one process (step time / N compute, counted bytes / link bandwidth):")
    for name, row in pcpp["modelled_speedup_vs_one_process"].items():
        print(f"    {name:<36}" + "  ".join(f"{k} {v:.2f}x" for k, v in row.items()))
    out = Path(__file__).parent / "results" / ("diffusion-quick.json" if args.quick else "diffusion.json")
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
