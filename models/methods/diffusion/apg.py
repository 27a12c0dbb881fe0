"""apg: adaptive projected guidance — Sadat, Hilliges & Weber, "Eliminating Oversaturation and Artifacts of
High Guidance Scales in Diffusion Models" (ICLR 2025; arXiv:2410.02416). The paper gives its rule as a short
PyTorch listing; no training code is needed. diffusers' `AdaptiveProjectedGuidance` guider
(https://github.com/huggingface/diffusers, `src/diffusers/guiders/adaptive_projected_guidance.py`) follows
that listing, and our rule is tested against its `normalized_guidance`.

Mechanism. CFG moves the conditional clean-image prediction D_c by (w − 1)·ΔD with ΔD = D_c − D_u. APG
changes that update, per step and per sample, in clean-image space (D = x̂₀):

    ΔD̄_t = ΔD + β·ΔD̄_{t+1}                       momentum over the sampling steps, from ΔD̄ = 0, β < 0
    ΔD̄  ← ΔD̄·min(1, r/‖ΔD̄‖₂)                      rescale to norm ≤ r (norm over C, H, W)
    Δ∥  = (⟨ΔD̄, D_c⟩/‖D_c‖²)·D_c,  Δ⊥ = ΔD̄ − Δ∥    split along and across the conditional prediction
    D_g = D_c + (w − 1)·(Δ⊥ + η·Δ∥)

The paper's observation is that the parallel part Δ∥ is what raises saturation as w grows, while the
orthogonal part carries the quality gain, so η < 1 (the paper recommends 0) keeps the gain without the
oversaturation; the rescale and the negative ("reverse") momentum follow from reading CFG as gradient
ascent on a conditional log-likelihood. η = 1, r = ∞, β = 0 is CFG exactly. The rule is
`models.diffusion.guidance.apg` (projections in float64, as the reference); the sampling core keeps the
momentum buffer per request and allows only first-order samplers with APG, because a second-order one
would advance the buffer twice per step. Unlike CFG, APG is not the same in ε- and x̂₀-space, so it runs
in x̂₀-space as the paper does.

Defaults: w = 8 (a "high" scale, where the paper's effect shows), η = 0, β = −0.5, r = 2. η = 0 as
the paper recommends and β = −0.5 as it uses for SDXL (with r = 15) are read from a port that quotes the
paper's appendix, not checked against the paper's tables; its values for other models were not read.
‖ΔD‖ depends on the model, so r for our 16×16 digit model is ours: the middle of the sweep
{0.5, 1, 2, 4}, fixed before any comparison was measured.

Reproduction (the paper's FID/recall/saturation comparison shrunk to CPU minutes): the family's base
model (a small prompt-conditioned DDPM on coloured 16×16 digits), class-only prompts, 20 DDIM steps,
16 images per digit; CFG against APG (η = 0, β = −0.5, r = 2) at w ∈ {4, 8}, 3 seeds. The metric is the
Fréchet distance on the evaluation kit's digit-classifier features (the paper: FID on Inception
features), averaged over w, one value per seed. The claim's other conditions, judged on the means over
seeds at every w: APG's |saturation − real saturation| is below CFG's, its k-NN recall is above CFG's,
and its digit accuracy is within 2 points of CFG's.
"""

from __future__ import annotations

import math
import statistics

from pydantic import Field

from models.context import RunContext
from models.diffusion.evaluation import EvaluationKit
from models.diffusion.grids import labelled_grids
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.jobs import SamplingParams, run_sampling_job, sample_classes
from models.diffusion.training import base_model
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep


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
    tiny={"smoke": True, "steps": 2, "per_class": 1},
)
def run(ctx: RunContext, params: APGParams) -> None:
    """Sample every digit with adaptive projected guidance and score the images against the real set."""
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
    parts = base_model(ctx, smoke)
    kit = EvaluationKit.build(ctx, smoke)
    scales = (4.0,) if smoke else SCALES_FULL
    seeds = seeds_for(seed, smoke)
    per_class, steps = (2, 3) if smoke else (16, 20)
    arms = {
        "cfg": lambda w: GuidanceSpec("cfg", w),
        "apg": lambda w: GuidanceSpec("apg", w, APG_ARM["eta"], APG_ARM["norm_threshold"], APG_ARM["momentum"]),
    }
    # scores[arm][w][i]: the scores of seed seeds[i]
    scores: dict[str, dict[str, list[dict[str, float]]]] = {arm: {} for arm in arms}
    grids, norms = {}, {}
    jobs = [(w, arm, s) for w in scales for arm in arms for s in seeds]
    for w, arm, s in sweep(ctx, jobs, label=lambda job: f"{job[1]} w={job[0]:g} seed {job[2]}"):
        result, labels = sample_classes(parts, arms[arm](w), per_class, steps=steps, seed=s)
        scores[arm].setdefault(str(w), []).append(kit.score(result.images, result.raw, labels))
        if s == seed:
            grids[f"{arm.upper()} w={w:g}"] = result.images[:: max(1, per_class // 4)][:40]
            if result.diff_norm:
                norms[f"w={w:g}"] = (list(range(len(result.diff_norm))), result.diff_norm)
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
    # FD is the claim's metric (judged over seeds by the harness); the other three are its further conditions
    conditions = ("saturation", "recall", "accuracy")
    holds = all(v[k] for v in per_w.values() for k in conditions)
    failed = sorted({f"{k} at w={w}" for w, v in per_w.items() for k in conditions if not v[k]})
    note = (
        f"{len(seeds)} seed(s) × {10 * per_class} images per arm, {steps} DDIM steps; APG η={APG_ARM['eta']}, "
        f"r={APG_ARM['norm_threshold']}, β={APG_ARM['momentum']}; real saturation {kit.real_saturation:.3f}. "
        + ("Saturation, recall and accuracy criteria hold at every w. " if holds else f"Fails: {', '.join(failed)}. ")
        + _accuracy_note(mean)
    )

    def fd_per_seed(arm: str) -> list[float]:
        return [statistics.fmean(scores[arm][w][i]["fd"] for w in scores[arm]) for i in range(len(seeds))]

    return Outcome(
        ours=fd_per_seed("apg"),
        baseline=fd_per_seed("cfg"),
        holds=holds,
        note=note,
        details={
            "scores": mean,
            "criteria": per_w,
            "real_saturation": kit.real_saturation,
            "apg": APG_ARM,
            "scales": list(scales),
            "seeds": seeds,
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
