"""cfg: classifier-free guidance sampling — Ho & Salimans, "Classifier-Free Diffusion Guidance" (NeurIPS
2021 Workshop on Deep Generative Models and Downstream Applications; arXiv:2207.12598). The paper
released no code; diffusers' `ClassifierFreeGuidance` guider is the reference implementation our rule
is tested against.

Mechanism. One network is trained both conditionally and, with the prompt dropped to a null token,
unconditionally; at sampling time the two predictions are extrapolated. The paper's Eq. 6 writes it in
ε-space as ε̃ = (1 + w′)·ε(z, c) − w′·ε(z); we write it with w = 1 + w′ in clean-image space,

    D_g = D_u + w·(D_c − D_u),

where D = x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t. The two forms give the same sampler because the ε ↔ x̂₀ map is
affine for fixed x_t and t. w = 1 is the conditional prediction alone, w = 0 the unconditional one.
The rule is `models.diffusion.guidance.cfg`; the sampling core (`models.diffusion.sampling`) runs the
conditional and null-prompt branches as one batched U-Net call per step.

The job. With class-only prompts (digit token, colour and thickness left null) it draws `per_class`
images of every digit from the family's base model (a small prompt-conditioned DDPM on coloured 16×16
digits, trained with 10% null-prompt dropout so that it has an unconditional branch), or from a
registered model, and scores them with the family's evaluation kit: Fréchet distance on a digit
classifier's 64-d features, k-NN precision/recall (k = 3), digit accuracy, foreground HSV saturation
and its gap to the real images, and the fraction of pixels outside [−1, 1] before clipping.

Defaults (ours, not the paper's, which samples ImageNet 64/128 with its own models): w = 4, 25 DDIM
steps, 20 images per digit. CFG is the baseline of the guidance papers in this family (APG).
"""

from __future__ import annotations

from models.context import RunContext
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
    tiny={"smoke": True, "steps": 2, "per_class": 1},
)
def run(ctx: RunContext, params: SamplingParams) -> None:
    """Sample every digit with classifier-free guidance and score the images (FD, precision/recall, saturation)."""
    run_sampling_job(ctx, params, GuidanceSpec("cfg", params.guidance_scale), "cfg")
