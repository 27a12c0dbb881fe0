"""pcpp: Partially Conditioned Patch Parallelism — Zhang, Luo & Lu, "Partially Conditioned Patch Parallelism
for Accelerated Diffusion Model Inference" (arXiv:2412.02962, 2024), against DistriFusion (Li et al.,
"DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion Models", CVPR 2024;
https://github.com/mit-han-lab/distrifuser) and single-process sampling. PCPP's code is a fork of
DistriFusion's (its attention module with `portion = 0.3` and a neighbour-exchange communication
manager); the fork's repository was not found, so this follows the paper and DistriFusion's code.

Patch parallelism. The image (here: a coloured 16×16 digit in 2×2 patches, 8 × 8 tokens of a mini-DiT,
`models.diffusion.dit`) is split into N horizontal strips of L tokens, one per process; every step,
process k computes ε for strip k, the strips' ε are all-gathered and every process steps the DDIM
scheduler on the full x_t. In a DiT only self-attention crosses strips, so the modes differ in which
keys and values strip k attends to (`models.diffusion.patch_parallel`):

* sync: fresh K, V of every strip, all-gathered per layer — exactly the single-process result.
* DistriFusion: its own fresh K, V plus the other strips' K, V from the previous step (stale), whose
  all-gather the reference overlaps with compute; after `warmup` synchronous steps.
* PCPP: K, V go only to the two neighbouring processes, and strip k attends to tokens
  [max(0, kL − ⌊pL⌋), min(NL, (k+1)L + ⌊pL⌋)): its own strip and the adjacent p-portion of each
  neighbour (stale after warm-up). Attention per process falls from L·NL to at most (1 + 2p)·L² keys,
  and K/V received per layer from N − 1 strips to at most 2, so PCPP/DistriFusion bytes after warm-up
  are the neighbour links over all pairs, 2(N − 1)/(N(N − 1)) = 2/N in total. The paper: ≈70% less
  communication than DistriFusion and 2.36–8.02× speed-up on 4–8 GPUs (DistriFusion 2.32–6.71×), at a
  possible loss of image quality.

Defaults: p = 0.3 (the reference's `portion`), 1 warm-up step, N = 4, 20 DDIM steps. Deviations: the
processes are CPU processes on gloo (forked, file store) instead of GPUs on NCCL, so time is not the
claim — communication volume and fidelity are; every exchange is synchronous (that changes time, not
numerics); like the reference we send whole neighbour strips, so bytes do not depend on p; the model is a
4-block mini-DiT (width 64) trained once and cached, not SDXL.

The job samples `per_class` images per digit with N processes in the chosen mode and logs the K/V and ε
bytes received, the message count and the PSNR against the single-process output of the same seeds.
`smoke` uses the seconds-long smoke mini-DiT (tests, demos) instead of the full one.

Reproduction (CPU minutes), 3 seeds: N = 4, 20 DDIM steps, 1 warm-up step, 80 images (8 per digit);
arms sync / DistriFusion / PCPP p ∈ {0, 0.3, 0.5, 1}. The metric is the K/V megabytes received per image
batch, PCPP (p = 0.3) against DistriFusion, one value per seed (the counts do not depend on the seed, the
images do). The claim's other conditions: every arm's bytes equal the closed form and sync reproduces the
single-process images (at every seed), PCPP p = 0.3's PSNR against the single-process output is within
2 dB (a margin fixed before measuring) of DistriFusion's, and PSNR does not fall as p grows (on the
means over seeds).
"""

from __future__ import annotations

import statistics
from typing import Literal

from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.diffusion.data import to_unit
from models.diffusion.dit import dit_model
from models.diffusion.evaluation import EvaluationKit, accuracy, psnr
from models.diffusion.grids import image_grid, labelled_grids
from models.diffusion.jobs import class_prompts
from models.diffusion.patch_parallel import ParallelSpec, expected_kv_bytes, key_range, sample_parallel, sample_single
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

PSNR_MARGIN_DB = 2.0
PORTIONS = (0.0, 0.3, 0.5, 1.0)


class PCPPParams(MethodParams):
    mode: Literal["sync", "distrifusion", "pcpp"] = Field("pcpp")
    world: int = Field(4, ge=1, le=8, description="processes (strips); must divide the 8 patch rows")
    portion: float = Field(0.3, ge=0.0, le=8.0, description="p: share of each neighbour strip attended to")
    warmup: int = Field(1, ge=0, le=1000, description="fully synchronous first steps")
    steps: int = Field(20, ge=1, le=1000)
    per_class: int = Field(8, ge=1, le=100, description="images per digit")
    smoke: bool = Field(
        False,
        description="use the seconds-long smoke mini-DiT (tests, demos; the images are noise) instead of the full one",
    )

    def spec(self) -> ParallelSpec:
        return ParallelSpec(self.mode, self.world, self.portion, self.warmup, self.steps)


def _seeds(n: int, seed: int) -> list[int]:
    return [seed * 100_000 + i for i in range(n)]


@method(
    "pcpp",
    family="diffusion",
    task="sample",
    paper="Partially Conditioned Patch Parallelism for Accelerated Diffusion Model Inference",
    datasets=("image-class",),
    params=PCPPParams,
    tiny={"smoke": True, "world": 2, "steps": 2, "per_class": 1},
)
def run(ctx: RunContext, params: PCPPParams) -> None:
    """Patch-parallel sampling of the mini-DiT; logs bytes exchanged and fidelity to one process."""
    if 8 % params.world:
        raise ValueError(f"world {params.world} must divide the DiT's 8 patch rows")
    model = dit_model(ctx, params.smoke)
    labels = class_prompts(params.per_class)
    seeds = _seeds(len(labels), ctx.seed)
    ctx.progress(0, 2, "single-process reference")
    reference = sample_single(model, labels, seeds, params.steps)
    stop_if_cancelled(ctx)
    ctx.progress(1, 2, f"{params.mode} on {params.world} processes")
    result = sample_parallel(model, params.spec(), labels, seeds)
    images = to_unit(result.images)
    ctx.log(
        params.steps,
        kv_bytes=result.kv_bytes,
        eps_bytes=result.eps_bytes,
        messages=sum(s.messages for s in result.stats),
        psnr_vs_single=psnr(images, to_unit(reference)),
    )
    ctx.save_artifact(f"{params.mode}_samples.png", image_grid(images, nrow=params.per_class), kind="image")
    ctx.progress(2, 2, f"{result.kv_bytes / 1e6:.2f} MB K/V received")


@reproduction(
    "pcpp",
    claim="PCPP exchanges less K/V than DistriFusion (exactly neighbour links / all pairs) at a "
    "fidelity to single-process sampling within 2 dB PSNR of DistriFusion's, rising with the portion p",
    metric="K/V bytes received per image batch, N=4 (MB)",
    direction="lower",
    baseline="distrifusion",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    per_class, steps = (1, 3) if smoke else (8, 20)
    portions = (0.0, 0.3) if smoke else PORTIONS
    world = 4
    seeds = seeds_for(seed, smoke)
    model = dit_model(ctx, smoke)
    kit = EvaluationKit.build(ctx, smoke)
    labels = class_prompts(per_class)
    arms = {
        "sync": ParallelSpec("sync", world, steps=steps),
        "distrifusion": ParallelSpec("distrifusion", world, warmup=1, steps=steps),
        **{f"pcpp p={p:g}": ParallelSpec("pcpp", world, p, 1, steps) for p in portions},
    }
    # per seed (in order of `seeds`): the single-process reference, then one row per arm
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    single_fd: list[float] = []
    grids: dict = {}
    single = single01 = None
    items = [(s, name) for s in seeds for name in ("single process", *arms)]
    for s, name in sweep(ctx, items, label=lambda item: f"{item[1]} seed {item[0]}"):
        if name == "single process":
            single = sample_single(model, labels, _seeds(len(labels), s), steps)
            single01 = to_unit(single)
            single_fd.append(kit.score(single01, single, labels)["fd"])
            if s == seed:
                grids[name] = single01
            continue
        spec = arms[name]
        result = sample_parallel(model, spec, labels, _seeds(len(labels), s))
        images = to_unit(result.images)
        rows[name].append(
            {
                "kv_bytes": result.kv_bytes,
                "kv_bytes_formula": expected_kv_bytes(spec, len(labels), model.config),
                "eps_bytes": result.eps_bytes,
                "ranks_agree": result.agree,
                "psnr_vs_single": psnr(images, single01),
                "max_abs_vs_single": (result.images - single).abs().max().item(),
                "class_agreement": accuracy(kit.net, images, kit.net.logits(single01).argmax(1)),
                "fd": kit.score(images, result.images, labels)["fd"],
            }
        )
        if s == seed and name in ("distrifusion", "pcpp p=0.3", "pcpp p=0"):
            grids[name] = images
    ctx.save_artifact("pcpp_samples.png", labelled_grids(grids, nrow=per_class, ncols=4), kind="image")
    mean = {
        name: {k: statistics.fmean(float(r[k]) for r in runs) for k in runs[0] if k != "ranks_agree"}
        for name, runs in rows.items()
    }
    pcpp_names = [f"pcpp p={p:g}" for p in portions]
    psnrs = [mean[n]["psnr_vs_single"] for n in pcpp_names]
    ctx.save_artifact(
        "pcpp_psnr_vs_portion.png",
        curves_figure({"PSNR vs single process (dB)": {"PCPP": (list(portions), psnrs)}}, "portion p"),
        kind="plot",
    )
    df, pc = mean["distrifusion"], mean["pcpp p=0.3"]
    # K/V bytes are the claim's metric (judged by the harness); the rest are its further conditions
    exact = all(r["kv_bytes"] == r["kv_bytes_formula"] and r["ranks_agree"] for runs in rows.values() for r in runs)
    sync_equal = all(r["max_abs_vs_single"] <= 1e-4 for r in rows["sync"])
    within = pc["psnr_vs_single"] >= df["psnr_vs_single"] - PSNR_MARGIN_DB
    monotone = all(b >= a - 1e-6 for a, b in zip(psnrs, psnrs[1:]))
    holds = exact and sync_equal and within and monotone
    note = (
        f"{len(seeds)} seed(s); N={world} gloo processes (forked), {steps} DDIM steps, 1 warm-up step, "
        f"{len(labels)} images per seed; mini-DiT width {model.config.width}, depth {model.config.depth}. K/V MB "
        f"received: DistriFusion {df['kv_bytes'] / 1e6:.2f}, PCPP {pc['kv_bytes'] / 1e6:.2f} "
        f"(ratio {pc['kv_bytes'] / df['kv_bytes']:.3f}; "
        f"bytes {'match' if exact else 'do NOT match'} the closed form). Mean PSNR vs single process: "
        f"DistriFusion {df['psnr_vs_single']:.2f} dB, PCPP p="
        + "/".join(f"{p:g}" for p in portions)
        + ": "
        + "/".join(f"{v:.2f}" for v in psnrs)
        + f" dB ({'monotone' if monotone else 'not monotone'} in p); "
        f"mean FD single {statistics.fmean(single_fd):.1f}, DistriFusion "
        f"{df['fd']:.1f}, PCPP p=0.3 {pc['fd']:.1f}. sync == single: {sync_equal}. Time is not measured as the "
        "claim (2 shared cores)." + ("" if within else _context_note(model.config.grid, world))
    )
    return Outcome(
        ours=[r["kv_bytes"] / 1e6 for r in rows["pcpp p=0.3"]],
        baseline=[r["kv_bytes"] / 1e6 for r in rows["distrifusion"]],
        holds=holds,
        note=note,
        details={
            "arms": mean,
            "ranks_agree": all(r["ranks_agree"] for runs in rows.values() for r in runs),
            "single_fd": statistics.fmean(single_fd),
            "psnr_margin_db": PSNR_MARGIN_DB,
            "world": world,
            "steps": steps,
            "seeds": seeds,
        },
    )


def _context_note(grid: int, world: int, portion: float = 0.3) -> str:
    """Why PCPP loses fidelity here: the share of the image an interior strip attends to after warm-up."""
    tokens = grid * grid // world
    lo, hi = key_range(1, world, tokens, portion)
    return (
        f" Why PCPP falls short: a strip is {grid // world} of {grid} patch rows, so at p={portion:g} an interior "
        f"strip attends to {(hi - lo) / (grid * grid):.0%} of the image's tokens after warm-up — the paper's "
        "(1+2p)/N too — but here one 16-px digit spans the whole image, so the dropped keys carry its shape, "
        "where the paper's SDXL scenes are locally coherent over many latent rows; that part is not testable "
        "at this scale."
    )
