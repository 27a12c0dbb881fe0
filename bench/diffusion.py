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
    rules = {"none": GuidanceSpec("none"), "cfg": GuidanceSpec("cfg", w),
             "apg": GuidanceSpec("apg", w, eta=0.0, norm_threshold=2.0, momentum=-0.5)}
    ours = {name: (lambda g=g: sample(parts, SampleRequest(prompt=prompt, guidance=g, steps=steps, n=n)))
            for name, g in rules.items()}
    theirs = {"diffusers-cfg": lambda: diffusers_loop(parts, ClassifierFreeGuidance(guidance_scale=w), n, steps, 0,
                                                      [3, 6, 3]),
              "diffusers-apg": lambda: diffusers_loop(parts, AdaptiveProjectedGuidance(
                  guidance_scale=w, adaptive_projected_guidance_momentum=-0.5,
                  adaptive_projected_guidance_rescale=2.0, eta=0.0), n, steps, 0, [3, 6, 3])}
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
    report = {"images_per_s": ips, "seconds": seconds, "n": n, "steps": steps, "widths": list(widths),
              "apg_over_cfg_time": ips["cfg"] / ips["apg"], "cfg_over_none_time": ips["none"] / ips["cfg"],
              "ours_cfg_over_diffusers_cfg_time": ips["diffusers-cfg"] / ips["cfg"],
              "ours_apg_over_diffusers_apg_time": ips["diffusers-apg"] / ips["apg"],
              "cfg_max_abs_diff_vs_diffusers": parity.item(), "load_average": os.getloadavg()}
    print(f"{'arm':<16}{'images/s':>10}")
    for k, v in ips.items():
        print(f"{k:<16}{v:>10.1f}")
    print(f"APG/CFG time {report['apg_over_cfg_time']:.3f}; CFG/none time {report['cfg_over_none_time']:.2f}; "
          f"ours/diffusers time: CFG {report['ours_cfg_over_diffusers_cfg_time']:.3f}, "
          f"APG {report['ours_apg_over_diffusers_apg_time']:.3f}; CFG output max |diff| vs diffusers "
          f"{report['cfg_max_abs_diff_vs_diffusers']:.2e}")
    out = Path(__file__).parent / "results" / ("diffusion-quick.json" if args.quick else "diffusion.json")
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
