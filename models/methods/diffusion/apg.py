"""apg: adaptive projected guidance (Sadat, Hilliges & Weber, "Eliminating Oversaturation and
Artifacts of High Guidance Scales in Diffusion Models", ICLR 2025).

APG replaces CFG's update D_u + w·ΔD by, in clean-image space (the paper's Alg. 1, Eqs. 5–9):
momentum on ΔD = D_c − D_u (ΔD̄_t = ΔD + β·ΔD̄_{t+1}, β < 0), a rescale of ΔD̄ to norm ≤ r, and a
split of ΔD̄ into parts parallel and orthogonal to D_c; D_g = D_c + (w−1)·(Δ⊥ + η·Δ∥). The
parallel part is what raises saturation at high w, so η = 0 drops it. The rule is
`models.diffusion.guidance.apg`; the sampling core keeps the momentum buffer per request.

Reproduction (the notes' protocol, shrunk to CPU minutes): the shared base model, class-only prompts,
DDIM; CFG vs APG (η = 0, β = −0.5, r = 2 — r set before measuring, the middle of the notes'
sweep {0.5, 1, 2, 4}, since ‖ΔD‖ depends on the model) at w ∈ {4, 8}; scores from the
evaluation kit (FD on classifier features, recall, |saturation − real|, accuracy).
"""

from __future__ import annotations

import math
import statistics

from pydantic import Field

from models.context import RunContext, cpu_threads
from models.diffusion.evaluation import EvaluationKit
from models.diffusion.grids import labelled_grids
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.jobs import SamplingParams, run_sampling_job, sample_classes
from models.diffusion.training import base_model
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction


class APGParams(SamplingParams):
    guidance_scale: float = Field(8.0, ge=0.0, le=50.0, description="w")
    eta: float = Field(0.0, description="weight of the parallel component (paper: 0)")
    norm_threshold: float = Field(2.0, description="rescale radius r on ‖ΔD̄‖ (≤ 0 or inf: off)")
    momentum: float = Field(-0.5, ge=-1.0, le=1.0, description="β (paper: negative)")

    def guidance(self) -> GuidanceSpec:
        r = self.norm_threshold if self.norm_threshold > 0 else math.inf
        return GuidanceSpec("apg", self.guidance_scale, self.eta, r, self.momentum)


@method(
    "apg",
    family="diffusion",
    task="sample",
    paper="Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models",
    datasets=("image-class",),
    params=APGParams,
)
def run(ctx: RunContext, params: APGParams) -> None:
    """Sample every digit with adaptive projected guidance and score the images against the real set."""
    with cpu_threads(ctx.resources):
        run_sampling_job(ctx, params, params.guidance(), "apg")


# -- reproduction -------------------------------------------------------------------------------
SCALES_FULL = (4.0, 8.0)
APG_ARM = dict(eta=0.0, norm_threshold=2.0, momentum=-0.5)


@reproduction(
    "apg",
    claim="At high guidance scales (w ≥ 4) APG keeps CFG's accuracy (within 2 points) with "
    "less oversaturation, lower FD and higher recall",
    metric="FD on classifier features (mean over w)",
    direction="lower",
    baseline="cfg",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    with cpu_threads(ctx.resources):
        parts = base_model(ctx, smoke)
        kit = EvaluationKit.build(ctx, smoke)
        scales = (4.0,) if smoke else SCALES_FULL
        seeds = [seed] if smoke else [seed, seed + 1]
        per_class, steps = (2, 3) if smoke else (16, 20)
        arms = {
            "cfg": lambda w: GuidanceSpec("cfg", w),
            "apg": lambda w: GuidanceSpec("apg", w, APG_ARM["eta"], APG_ARM["norm_threshold"], APG_ARM["momentum"]),
        }
        scores: dict[str, dict[str, list[dict[str, float]]]] = {arm: {} for arm in arms}
        grids, norms = {}, {}
        jobs = [(w, arm, s) for w in scales for arm in arms for s in seeds]
        for i, (w, arm, s) in enumerate(jobs):
            if ctx.cancelled():
                raise InterruptedError("reproduction cancelled")
            result, labels = sample_classes(parts, arms[arm](w), per_class, steps=steps, seed=s)
            scores[arm].setdefault(str(w), []).append(kit.score(result.images, result.raw, labels))
            if s == seed:
                grids[f"{arm.upper()} w={w:g}"] = result.images[:: max(1, per_class // 4)][:40]
                if result.diff_norm:
                    norms[f"w={w:g}"] = (list(range(len(result.diff_norm))), result.diff_norm)
            ctx.progress(i + 1, len(jobs), f"{arm} w={w:g} seed {s}")
    mean = {
        arm: {w: {k: statistics.fmean(r[k] for r in runs) for k in runs[0]} for w, runs in by_w.items()}
        for arm, by_w in scores.items()
    }
    ctx.save_artifact(
        "apg_vs_cfg.png", labelled_grids(grids, nrow=4, ncols=len(arms), title="CFG vs APG (DDIM)"), kind="image"
    )
    if norms:
        ctx.save_artifact("apg_diff_norm.png", curves_figure({"mean ‖ΔD̄‖ (APG)": norms}, "DDIM step"), kind="plot")
    per_w = {
        w: {
            "fd": mean["apg"][w]["fd"] < mean["cfg"][w]["fd"],
            "saturation": mean["apg"][w]["saturation_gap"] < mean["cfg"][w]["saturation_gap"],
            "recall": mean["apg"][w]["recall"] > mean["cfg"][w]["recall"],
            "accuracy": mean["apg"][w]["accuracy"] >= mean["cfg"][w]["accuracy"] - 0.02,
        }
        for w in mean["cfg"]
    }
    holds = all(all(v.values()) for v in per_w.values())
    failed = sorted({f"{k} at w={w}" for w, v in per_w.items() for k, ok in v.items() if not ok})
    note = (
        f"{len(seeds)} seed(s) × {10 * per_class} images per arm, {steps} DDIM steps; APG η={APG_ARM['eta']}, "
        f"r={APG_ARM['norm_threshold']}, β={APG_ARM['momentum']}; real saturation {kit.real_saturation:.3f}. "
        + ("All four criteria hold at every w." if holds else f"Fails: {', '.join(failed)}. ")
        + _accuracy_note(mean)
    )
    return Outcome(
        ours=statistics.fmean(m["fd"] for m in mean["apg"].values()),
        baseline=statistics.fmean(m["fd"] for m in mean["cfg"].values()),
        seeds=len(seeds),
        holds=holds,
        note=note,
        details={
            "scores": mean,
            "criteria": per_w,
            "real_saturation": kit.real_saturation,
            "apg": APG_ARM,
            "scales": list(scales),
        },
    )


def _accuracy_note(mean: dict[str, dict[str, dict[str, float]]]) -> str:
    """Why accuracy can fall short: η = 0 and the radius r weaken the update, so APG at w follows
    CFG at a smaller w on accuracy (stated only when the measured numbers show it)."""
    ws = sorted(mean["cfg"], key=float)
    short = [w for w in ws if mean["apg"][w]["accuracy"] < mean["cfg"][w]["accuracy"] - 0.02]
    if not short:
        return ""
    w = short[-1]
    lower = [v for v in ws if float(v) < float(w) and mean["cfg"][v]["accuracy"] <= mean["apg"][w]["accuracy"]]
    acc = ", ".join(f"CFG w={v}: {mean['cfg'][v]['accuracy']:.3f}" for v in ws)
    return (
        f"APG's accuracy at w={w} is {mean['apg'][w]['accuracy']:.3f} ({acc})"
        + (f", above CFG's at w={lower[-1]}" if lower else "")
        + ": dropping the parallel part (η=0) and capping ‖ΔD̄‖ weaken the guidance, so APG needs a larger w "
        "for CFG's class adherence; larger w was not swept."
    )
