"""pcpp: Partially Conditioned Patch Parallelism for Accelerated Diffusion Model Inference, against
DistriFusion-style full stale exchange (Li et al., CVPR 2024) and single-process sampling.

The mechanism is `models.diffusion.patch_parallel` on the mini-DiT of `models.diffusion.dit`: N
processes (gloo), one horizontal strip each; DistriFusion all-gathers every strip's K, V each layer and
step (used one step stale), PCPP exchanges K, V only with the two neighbouring strips and attends to
its own strip plus a p-portion of each neighbour (the reference's default p = 0.3).

Reproduction (the notes' protocol shrunk to CPU minutes; the claim is measured as communication
volume and fidelity, not time — 2 shared cores): N = 4 ranks, 20 DDIM steps, 1 warm-up step, 80
images (8 per digit), arms sync / DistriFusion / PCPP p ∈ {0, 0.3, 0.5, 1}. Holds if every arm's
received K/V bytes equal the closed form (PCPP/DistriFusion after warm-up = 6/12 neighbour links at
N = 4), sync reproduces the single-process images, PCPP p = 0.3 stays within 2 dB PSNR (margin fixed
before measuring) of DistriFusion's fidelity to the single-process output, and PSNR does not fall as
p grows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.context import RunContext, cpu_threads
from models.diffusion.data import to_unit
from models.diffusion.dit import dit_model
from models.diffusion.evaluation import EvaluationKit, accuracy, psnr
from models.diffusion.grids import image_grid, labelled_grids
from models.diffusion.jobs import class_prompts
from models.diffusion.patch_parallel import ParallelSpec, expected_kv_bytes, key_range, sample_parallel, sample_single
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction

PSNR_MARGIN_DB = 2.0
PORTIONS = (0.0, 0.3, 0.5, 1.0)


class PCPPParams(MethodParams):
    mode: Literal["sync", "distrifusion", "pcpp"] = Field("pcpp")
    world: int = Field(4, ge=1, le=8, description="processes (strips); must divide the 8 patch rows")
    portion: float = Field(0.3, ge=0.0, le=8.0, description="p: share of each neighbour strip attended to")
    warmup: int = Field(1, ge=0, le=1000, description="fully synchronous first steps")
    steps: int = Field(20, ge=1, le=1000)
    per_class: int = Field(8, ge=1, le=100)

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
)
def run(ctx: RunContext, params: PCPPParams) -> None:
    """Patch-parallel sampling of the mini-DiT; logs bytes exchanged and fidelity to one process."""
    if 8 % params.world:
        raise ValueError(f"world {params.world} must divide the DiT's 8 patch rows")
    with cpu_threads(ctx.resources):
        model = dit_model(ctx)
        labels = class_prompts(params.per_class)
        seeds = _seeds(len(labels), ctx.seed)
        reference = sample_single(model, labels, seeds, params.steps)
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
    with cpu_threads(ctx.resources):
        model = dit_model(ctx, smoke)
        kit = EvaluationKit.build(ctx, smoke)
        labels = class_prompts(per_class)
        seeds = _seeds(len(labels), seed)
        single = sample_single(model, labels, seeds, steps)
        single01 = to_unit(single)
        arms = {
            "sync": ParallelSpec("sync", world, steps=steps),
            "distrifusion": ParallelSpec("distrifusion", world, warmup=1, steps=steps),
            **{f"pcpp p={p:g}": ParallelSpec("pcpp", world, p, 1, steps) for p in portions},
        }
        rows, grids = {}, {"single process": single01}
        for i, (name, spec) in enumerate(arms.items()):
            result = sample_parallel(model, spec, labels, seeds)
            images = to_unit(result.images)
            rows[name] = {
                "kv_bytes": result.kv_bytes,
                "kv_bytes_formula": expected_kv_bytes(spec, len(labels), model.config),
                "eps_bytes": result.eps_bytes,
                "ranks_agree": result.agree,
                "psnr_vs_single": psnr(images, single01),
                "max_abs_vs_single": (result.images - single).abs().max().item(),
                "class_agreement": accuracy(kit.net, images, kit.net.logits(single01).argmax(1)),
                "fd": kit.score(images, result.images, labels)["fd"],
            }
            if name in ("distrifusion", "pcpp p=0.3", "pcpp p=0"):
                grids[name] = images
            ctx.progress(i + 1, len(arms), name)
    single_fd = kit.score(single01, single, labels)["fd"]
    ctx.save_artifact("pcpp_samples.png", labelled_grids(grids, nrow=per_class, ncols=4), kind="image")
    pcpp_names = [f"pcpp p={p:g}" for p in portions]
    ctx.save_artifact(
        "pcpp_psnr_vs_portion.png",
        curves_figure(
            {
                "PSNR vs single process (dB)": {
                    "PCPP": (list(portions), [rows[n]["psnr_vs_single"] for n in pcpp_names])
                }
            },
            "portion p",
        ),
        kind="plot",
    )
    df, pc = rows["distrifusion"], rows["pcpp p=0.3"]
    exact = all(r["kv_bytes"] == r["kv_bytes_formula"] and r["ranks_agree"] for r in rows.values())
    sync_equal = rows["sync"]["max_abs_vs_single"] <= 1e-4
    within = pc["psnr_vs_single"] >= df["psnr_vs_single"] - PSNR_MARGIN_DB
    psnrs = [rows[n]["psnr_vs_single"] for n in pcpp_names]
    monotone = all(b >= a - 1e-6 for a, b in zip(psnrs, psnrs[1:]))
    holds = exact and sync_equal and within and monotone and pc["kv_bytes"] < df["kv_bytes"]
    note = (
        f"N={world} gloo processes (forked), {steps} DDIM steps, 1 warm-up step, {len(labels)} images; mini-DiT "
        f"width {model.config.width}, depth {model.config.depth}. K/V MB received: DistriFusion "
        f"{df['kv_bytes'] / 1e6:.2f}, PCPP {pc['kv_bytes'] / 1e6:.2f} "
        f"(ratio {pc['kv_bytes'] / df['kv_bytes']:.3f}; "
        f"bytes {'match' if exact else 'do NOT match'} the closed form). PSNR vs single process: DistriFusion "
        f"{df['psnr_vs_single']:.2f} dB, PCPP p="
        + "/".join(f"{p:g}" for p in portions)
        + ": "
        + "/".join(f"{v:.2f}" for v in psnrs)
        + f" dB ({'monotone' if monotone else 'not monotone'} in p); "
        f"FD single {single_fd:.1f}, DistriFusion "
        f"{df['fd']:.1f}, PCPP p=0.3 {pc['fd']:.1f}. sync == single: {sync_equal}. Time is not measured as the "
        "claim (2 shared cores)." + ("" if within else _context_note(model.config.grid, world))
    )
    return Outcome(
        ours=pc["kv_bytes"] / 1e6,
        baseline=df["kv_bytes"] / 1e6,
        seeds=1,
        holds=holds,
        note=note,
        details={
            "arms": rows,
            "single_fd": single_fd,
            "psnr_margin_db": PSNR_MARGIN_DB,
            "world": world,
            "steps": steps,
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
