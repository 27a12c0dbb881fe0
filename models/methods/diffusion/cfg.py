"""cfg: classifier-free guidance sampling (Ho & Salimans, "Classifier-Free Diffusion Guidance",
2022, Eq. 6 in ε-space; identical in clean-image space since the ε ↔ x̂₀ map is affine):
D_g = D_u + w·(D_c − D_u). The baseline of the guidance papers (APG); the rule itself is
`models.diffusion.guidance.cfg`, and it agrees with diffusers' `ClassifierFreeGuidance` (test).
"""

from __future__ import annotations

from models.context import RunContext, cpu_threads
from models.diffusion.guidance import GuidanceSpec
from models.diffusion.jobs import SamplingParams, run_sampling_job
from models.registry import method


@method(
    "cfg",
    family="diffusion",
    task="sample",
    paper="Classifier-Free Diffusion Guidance",
    datasets=("image-class",),
    params=SamplingParams,
)
def run(ctx: RunContext, params: SamplingParams) -> None:
    """Sample every digit with classifier-free guidance and score the images (FD, precision/recall, saturation)."""
    with cpu_threads(ctx.resources):
        run_sampling_job(ctx, params, GuidanceSpec("cfg", params.guidance_scale), "cfg")
