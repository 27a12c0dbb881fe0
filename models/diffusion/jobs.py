"""What the family's sampling jobs share: params, model loading, class-balanced sampling and scoring.

A sampling job (`cfg`, `apg`) draws `per_class` images of every digit with class-only prompts
(the APG paper's class-conditional protocol at digit scale), scores them with the evaluation kit and
saves a grid; the arms of a reproduction go through the same `sample_classes` + `EvaluationKit.score`.
A job reports progress and checks for cancellation once per digit. With `smoke` it uses the
seconds-long base model and one-epoch evaluation classifier of the reproductions' smoke mode (for
tests and demos: their images are noise) instead of the full ones, which train for minutes the
first time a cache folder needs them.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.diffusion.evaluation import EvaluationKit
from models.diffusion.grids import image_grid
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import DiffusionParts, load_parts
from models.diffusion.sampling import SampleRequest, SampleResult, mean_rows, sample
from models.diffusion.training import base_model
from models.model_params import model_field
from models.registry import MethodParams


class SamplingParams(MethodParams):
    model: str = model_field(
        "registered model (name@version) or local diffusers folder; empty = the shared base model (trained once "
        "if missing)",
        "diffusers",
    )
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0, description="w; 1 = conditional prediction alone")
    sampler: str = Field("ddim", description="ddim | ddpm | euler | euler-ancestral | dpm-solver | heun")
    steps: int = Field(25, ge=1, le=1000)
    per_class: int = Field(20, ge=1, le=500, description="images per digit")
    seed: int = 0
    smoke: bool = Field(
        False,
        description="use the seconds-long smoke base model and evaluation classifier (tests, demos; the images "
        "are noise) instead of the full ones; ignored for the model when `model` names one",
    )


def load_for_job(ctx: RunContext, ref: str, smoke: bool = False) -> DiffusionParts:
    """The named model (or the shared base), on the job's device."""
    return (load_parts(ctx.load_model(ref)) if ref else base_model(ctx, smoke)).to(ctx.device)


def class_prompts(per_class: int) -> torch.Tensor:
    """Digits 0..9, `per_class` each, in blocks (so a grid shows one row per digit)."""
    return torch.arange(10).repeat_interleave(per_class)


def sample_classes(
    parts: DiffusionParts,
    guidance: GuidanceSpec,
    per_class: int,
    *,
    sampler: str = "ddim",
    steps: int = 25,
    seed: int = 0,
    ctx: RunContext | None = None,
) -> tuple[SampleResult, torch.Tensor]:
    """`per_class` images per digit with class-only prompts; seeds differ per image and per digit. With a
    run context, reports progress and checks for cancellation (raising `Cancelled`) before each digit."""
    results = []
    for digit in range(10):
        if ctx is not None:
            stop_if_cancelled(ctx)
            ctx.progress(digit, 10, f"digit {digit}")
        req = SampleRequest(
            prompt=[digit, None, None],
            guidance=guidance,
            sampler=sampler,
            steps=steps,
            seed=seed * 100_000 + digit * 1000,
            n=per_class,
        )
        results.append(sample(parts, req))
    merged = SampleResult(
        torch.cat([r.images for r in results]),
        torch.cat([r.raw for r in results]),
        [s for r in results for s in r.seeds],
        mean_rows([r.diff_norm for r in results]),
        mean_rows([r.parallel_fraction for r in results]),
    )
    return merged, class_prompts(per_class)


def run_sampling_job(ctx: RunContext, params: SamplingParams, guidance: GuidanceSpec, name: str) -> dict[str, float]:
    """Sample, score, log and save a grid; returns the scores."""
    parts = load_for_job(ctx, params.model, params.smoke)
    result, labels = sample_classes(
        parts, guidance, params.per_class, sampler=params.sampler, steps=params.steps, seed=params.seed, ctx=ctx
    )
    kit = EvaluationKit.build(ctx, params.smoke)
    scores = kit.score(result.images, result.raw, labels)
    ctx.log(0, **scores, real_saturation=kit.real_saturation)
    for i, (norm, frac) in enumerate(zip(result.diff_norm, result.parallel_fraction)):
        ctx.log(i, diff_norm=norm, parallel_fraction=frac)
    ctx.save_artifact(f"{name}_samples.png", image_grid(result.images, nrow=params.per_class), kind="image")
    ctx.save_artifact(f"{name}_scores.json", {**scores, "real_saturation": kit.real_saturation}, kind="json")
    ctx.progress(1, 1, " ".join(f"{k}={v:.3g}" for k, v in scores.items() if math.isfinite(v)))
    return scores
