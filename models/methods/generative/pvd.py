"""pvd: progressive volume distillation between radiance-field architectures — Shuangkang Fang, Weixin Xu, Heng
Wang, Yi Yang, Yufeng Wang & Shuchang Zhou, "One is All: Bridging the Gap Between Neural Radiance Fields
Architectures with Progressive Volume Distillation" (AAAI 2023; arXiv:2211.15977). Official code:
https://github.com/megvii-research/AAAI2023-PVD (`main_distill_mutual.py`, `distill_mutual/utils.py: train_step`,
`distill_mutual/network.py`), built on torch-ngp's CUDA extensions; here everything is plain PyTorch.

Mechanism. Every architecture (hash grid, dense grid, MLP) ends its geometry part in the same k-dimensional
feature h(x) (channel 0: pre-activation density), then σ = trunc_exp(h₀) and a colour head. A student is trained
from a teacher without any image: rays from random camera poses are sampled at stratified points, and teacher and
student are queried at the *same* points. The losses come in three stages (of the reference's 30k iterations,
stage 1 below 2k, stage 2 below 5k):

    stage 1:  λ_f·‖h_s − h_t‖²                                       (the volume-aligned feature)
    stage 2:  + λ_σ·‖h₀,s − h₀,t‖² + λ_c·Σ_i w_t,i ‖c_s − c_t‖²_i / Σ_i w_t,i   (density and colour)
    stage 3:  + λ_rgb·‖C_s − C_t‖²                                    (rendered colour, C = Σ_i T_i α_i c_i)

with λ_rgb = 1, λ_f = λ_σ = λ_c = 0.002 and λ_f decaying ×0.995 per step; h₀ is clamped to [−2, 7] before
trunc_exp in teacher and student alike, and in the teacher's targets, so the student imitates densities in a common
range rather than the teacher's extreme values (the paper's stabiliser). The reference clamps the student's h₀ in
its losses too; here the student's h₀ enters the losses unclamped, because the clamp's zero gradient below −2
left every density that overshot during the first (feature) stage dead, and the short-schedule students rendered
black images.

What is reconstructed for CPU minutes: a procedural scene (three spheres and a box, 40 views of 32×32 rendered by
our renderer; 32 train, 8 test) instead of NeRF-Synthetic; the teacher is a hash grid (8 levels, 2¹⁴ entries, 2
features) + tiny MLP trained on the training views for 30 CPU seconds, once per seed; the student an MLP (PE 6, 4 ×
64). Budgets are CPU seconds (process time): 40 for every student arm, the teacher's own training not counted (PVD
converts an existing model), its queries during distillation counted. Every step takes 256 rays × 32 stratified
samples (a distillation step's rays spread over 16 random cameras), Adam at 5·10⁻³ (the teacher 10⁻²). The stage
boundaries sit at the same fractions of the budget as the reference's (1/15 and 1/6) and λ_f decays as 0.995^(30,000
· fraction of the budget), the reference's decay stretched to the short schedule. Losses are mean squares rather
than the reference's Frobenius norms, and the colour loss is weighted by the teacher's rendering weights w_t:
torch-ngp's occupancy grid never samples empty space, our renderer does, and there the teacher's colours were never
trained (often saturated at 0 or 1; chasing them drove the student's colour head into saturation, every image
white). Arms: the MLP from scratch on the training images (the baseline), PVD, RGB-only distillation (stage 3
alone), PVD without the clamp, and, reported only, PVD from the distilled MLP into a 32³ dense grid (the reverse
direction).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.diffusion.grids import image_grid, labelled_grids
from models.fields.fitting import EVAL_SAMPLES, Budget, BudgetClock, finish_curve, fit_to_views, held_out_psnr
from models.fields.radiance import RadianceField, build_field, clamp_density, hash_field, load_field, save_field
from models.fields.rendering import (
    Rays,
    bin_widths,
    camera_rays,
    composite,
    look_at,
    render_weights,
    sample_points,
    stratified_depths,
)
from models.fields.scene import (
    CAMERA_RADIUS,
    FAR,
    FOCAL,
    IMAGE_SIZE,
    NEAR,
    SceneViews,
    random_pose,
    render,
    scene_views,
)
from models.plots import curves_figure
from models.registry import MethodParams, method
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep

Mode = Literal["pvd", "rgb-only", "no-clamp"]
STAGES = (2_000 / 30_000, 5_000 / 30_000)  # the reference's stage boundaries as fractions of its 30k iterations
REFERENCE_STEPS = 30_000
AUX_WEIGHT = 0.002  # λ_f, λ_σ, λ_c
FEATURE_DECAY = 0.995


@dataclass(frozen=True)
class DistillLosses:
    """One step's loss terms (already weighted) and the total."""

    feature: torch.Tensor
    density: torch.Tensor
    colour: torch.Tensor
    rgb: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.feature + self.density + self.colour + self.rgb


def distillation_losses(
    teacher: RadianceField,
    student: RadianceField,
    points: torch.Tensor,
    deltas: torch.Tensor,
    mode: Mode,
    fraction: float,
) -> DistillLosses:
    """The staged PVD losses at shared sample points ([R, S, 3]) with bin widths δ ([R, S])."""
    clamp = mode != "no-clamp"
    with torch.no_grad():
        h_t = teacher.features(points)
        sigma_t, colour_t = teacher.density_and_colour(h_t, clamp)
        weights_t = render_weights(sigma_t, deltas)
        rgb_t = composite(weights_t, colour_t)
        if clamp:
            h_t = clamp_density(h_t)
    h_s = student.features(points)  # unclamped in the losses: an h₀ that overshoots the range is pulled back
    sigma_s, colour_s = student.density_and_colour(h_s, clamp)
    rgb = F.mse_loss(composite(render_weights(sigma_s, deltas), colour_s), rgb_t)
    zero = rgb.new_zeros(())
    if mode == "rgb-only":
        return DistillLosses(zero, zero, zero, rgb)
    feature = AUX_WEIGHT * FEATURE_DECAY ** (REFERENCE_STEPS * fraction) * F.mse_loss(h_s, h_t)
    if fraction < STAGES[0]:
        return DistillLosses(feature, zero, zero, zero)
    density = AUX_WEIGHT * F.mse_loss(h_s[..., 0], h_t[..., 0])
    # where no light comes from, the teacher's colour was never trained (often saturated): weight by w_t
    colour = AUX_WEIGHT * (weights_t[..., None] * (colour_s - colour_t) ** 2).sum() / (3 * weights_t.sum() + 1e-8)
    return DistillLosses(feature, density, colour, rgb if fraction >= STAGES[1] else zero)


POSES_PER_STEP = 16


def random_pose_rays(count: int, generator: torch.Generator) -> Rays:
    """`count` rays spread over POSES_PER_STEP random cameras (one camera per batch makes the batches too alike)."""
    per_pose = -(-count // POSES_PER_STEP)
    picked = []
    for _ in range(POSES_PER_STEP):
        rays = camera_rays(random_pose(generator), IMAGE_SIZE, FOCAL)
        picked.append(rays[torch.randperm(len(rays), generator=generator)[:per_pose]])
    origins = torch.cat([r.origins for r in picked])[:count]
    return Rays(origins, torch.cat([r.directions for r in picked])[:count])


def distill(
    ctx: RunContext,
    teacher: RadianceField,
    student: RadianceField,
    views: SceneViews,
    budget: Budget,
    seed: int,
    mode: Mode = "pvd",
    lr: float = 5e-3,
    rays_per_step: int = 512,
    samples: int = 32,
) -> list[tuple[float, float]]:
    """Train `student` from `teacher` on rays of random poses (no images); (CPU seconds, test PSNR) curve."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    clock, curve = BudgetClock(budget), []
    clamp = mode != "no-clamp"
    for _ in clock.steps():
        stop_if_cancelled(ctx)
        rays = random_pose_rays(rays_per_step, generator)
        depths = stratified_depths(len(rays), samples, NEAR, FAR, generator)
        losses = distillation_losses(
            teacher, student, sample_points(rays, depths), bin_widths(depths, FAR), mode, clock.fraction()
        )
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        if clock.due():
            curve.append((clock.used, held_out_psnr(lambda p: student(p, clamp), views)))
    return finish_curve(curve, clock, lambda: held_out_psnr(lambda p: student(p, clamp), views))


class PVDParams(MethodParams):
    teacher: str = Field(
        "", max_length=200, description="registered field (name[@version]) to distil from; empty: train a hash grid"
    )
    teacher_seconds: float = Field(30.0, ge=0.0, le=3600.0, description="CPU seconds to train the hash-grid teacher")
    student: Literal["mlp", "dense"] = Field("mlp", description="student architecture")
    mode: Mode = Field("pvd", description="pvd (three stages, clamp), rgb-only (stage 3 alone), no-clamp")
    seconds: float = Field(40.0, ge=0.0, le=3600.0, description="CPU seconds for the student (and the baseline)")
    steps: int = Field(0, ge=0, le=1_000_000, description="step cap for every trained field (0: none)")
    baseline: bool = Field(True, description="also train the student from scratch on the views, same budget")
    lr: float = Field(5e-3, gt=0.0, le=1.0, description="Adam learning rate (the hash teacher: 2×)")
    rays_per_step: int = Field(256, ge=1, le=65_536, description="rays per step")
    samples: int = Field(32, ge=2, le=1024, description="stratified samples per ray")
    evaluations: int = Field(4, ge=1, le=100, description="test-view evaluations spread over each budget")
    render: str = Field("", max_length=200, description="instead of training, render this registered field as PNG")
    azimuth: float = Field(30.0, ge=-360.0, le=360.0, description="camera azimuth in degrees (render)")
    elevation: float = Field(30.0, ge=-89.0, le=89.0, description="camera elevation in degrees (render)")

    def budget(self, seconds: float) -> Budget:
        return Budget(seconds=seconds, steps=self.steps, evaluations=self.evaluations)


def train_teacher(ctx: RunContext, views: SceneViews, params: PVDParams, seed: int) -> RadianceField:
    torch.manual_seed(seed)
    teacher = hash_field(torch.Generator().manual_seed(seed))
    fit_to_views(
        ctx,
        teacher,
        views,
        params.budget(params.teacher_seconds),
        seed,
        2 * params.lr,
        params.rays_per_step,
        params.samples,
    )
    return teacher


def scratch_student(
    ctx: RunContext, views: SceneViews, params: PVDParams, seed: int
) -> tuple[RadianceField, list[tuple[float, float]]]:
    torch.manual_seed(seed + 1)
    student = build_field(params.student, torch.Generator().manual_seed(seed + 1))
    curve = fit_to_views(
        ctx, student, views, params.budget(params.seconds), seed, params.lr, params.rays_per_step, params.samples
    )
    return student, curve


def distilled_student(
    ctx: RunContext,
    teacher: RadianceField,
    views: SceneViews,
    params: PVDParams,
    seed: int,
    mode: Mode,
    architecture: str | None = None,
) -> tuple[RadianceField, list[tuple[float, float]]]:
    torch.manual_seed(seed + 1)
    student = build_field(architecture or params.student, torch.Generator().manual_seed(seed + 1))
    curve = distill(
        ctx,
        teacher,
        student,
        views,
        params.budget(params.seconds),
        seed,
        mode,
        params.lr,
        params.rays_per_step,
        params.samples,
    )
    return student, curve


@method(
    "pvd",
    family="generative",
    task="train",
    paper="One is All: Bridging the Gap Between Neural Radiance Fields Architectures with Progressive Volume "
    "Distillation",
    datasets=(),
    params=PVDParams,
    tiny={"teacher_seconds": 1.0, "seconds": 1.0, "steps": 3, "rays_per_step": 16, "samples": 8, "evaluations": 1},
)
def run(ctx: RunContext, params: PVDParams) -> None:
    """Distil a radiance field into another architecture from random-pose rays (or render a registered field)."""
    if params.render:
        return render_registered(ctx, params)
    views = scene_views()
    arms = 2 + int(params.baseline)
    ctx.progress(0, arms, "teacher: hash grid" if not params.teacher else f"teacher: {params.teacher}")
    teacher = (
        load_field(ctx.load_model(params.teacher)) if params.teacher else train_teacher(ctx, views, params, ctx.seed)
    )
    fields: dict[str, tuple[RadianceField, bool]] = {"teacher": (teacher, False)}  # field, rendered clamped
    curves: dict[str, list[tuple[float, float]]] = {}
    if params.baseline:
        ctx.progress(1, arms, "scratch: student on the views")
        scratch, curves["scratch"] = scratch_student(ctx, views, params, ctx.seed)
        fields["scratch"] = (scratch, False)
    ctx.progress(arms - 1, arms, f"distillation: {params.mode}")
    student, curves[params.mode] = distilled_student(ctx, teacher, views, params, ctx.seed, params.mode)
    fields[params.mode] = (student, params.mode != "no-clamp")
    for name, curve in curves.items():
        for i, (_, psnr) in enumerate(curve):
            ctx.log(i, **{f"{name}_test_psnr": psnr})
    ctx.log(
        0, teacher_test_psnr=held_out_psnr(lambda p: teacher(p, False), views), test_psnr=curves[params.mode][-1][1]
    )
    ctx.progress(arms, arms, "artifacts")
    ctx.save_artifact("test_views.png", views_figure(views, fields), kind="image")
    panels = {"held-out PSNR (dB)": {k: ([s for s, _ in c], [p for _, p in c]) for k, c in curves.items()}}
    ctx.save_artifact("psnr_vs_seconds.png", curves_figure(panels, "CPU seconds"), kind="plot")
    if not params.teacher:
        ctx.register_model(
            "pvd-teacher", save_field(teacher, "hash", ctx.workdir / "teacher"), {"architecture": "hash"}
        )
    folder = save_field(student, params.student, ctx.workdir / "student")
    ctx.register_model("pvd-student", folder, {"architecture": params.student, "mode": params.mode})


def render_registered(ctx: RunContext, params: PVDParams) -> None:
    """A registered field seen from (azimuth, elevation) at radius 3, 32×32, as a PNG."""
    ctx.progress(0, 1, f"rendering {params.render}")
    field = load_field(ctx.load_model(params.render))
    rays = camera_rays(look_at(params.azimuth, params.elevation, CAMERA_RADIUS), IMAGE_SIZE, FOCAL)
    with torch.no_grad():
        image = render(field, rays, EVAL_SAMPLES).clamp(0, 1)
    ctx.save_artifact("render.png", image_grid(image.T.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE), scale=8), kind="image")
    ctx.log(0, mean_intensity=float(image.mean()))
    ctx.progress(1, 1, "done")


def views_figure(views: SceneViews, fields: dict[str, tuple[RadianceField, bool]]) -> Figure:
    """Ground truth and each field on the first four test views."""
    shown = list(views.test)[:4]
    grids = {"ground truth": views.images[shown].transpose(1, 2).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)}
    rays, _ = views.rays(shown)
    with torch.no_grad():
        for name, (field, clamp) in fields.items():
            rgb = render(lambda p, f=field, c=clamp: f(p, c), rays, EVAL_SAMPLES).clamp(0, 1)
            grids[name] = rgb.reshape(len(shown), -1, 3).transpose(1, 2).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return labelled_grids(grids, nrow=2, ncols=len(grids), title="test views")


# -- reproduction -------------------------------------------------------------------------------
ABLATION_SEEDS = 2  # RGB-only and no-clamp run on the first two seeds, the reverse conversion on the first


@reproduction(
    "pvd",
    claim="At equal CPU time, an MLP distilled from a hash-grid teacher (PVD) beats the MLP trained from scratch "
    "by ≥ 1 dB test PSNR, and beats RGB-only distillation and PVD without the density clamp",
    metric="test PSNR (dB) of the MLP after its budget",
    direction="higher",
    baseline="scratch MLP",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per seed one hash-grid teacher (30 CPU s on the 32 training views), then students with 40 CPU s each: scratch
    and PVD on 3 seeds, RGB-only and no-clamp on 2, MLP → 32³ dense grid (PVD) on 1, reported only."""
    params = PVDParams(teacher_seconds=2, seconds=2, rays_per_step=64, samples=16) if smoke else PVDParams()
    views = scene_views()
    seeds = seeds_for(seed, smoke)
    ablation = seeds[:ABLATION_SEEDS]
    jobs: list[tuple[int, str]] = []
    for s in seeds:
        jobs += [(s, "teacher"), (s, "scratch"), (s, "pvd")]
        jobs += [(s, arm) for arm in ("rgb-only", "no-clamp") if s in ablation]
        jobs += [(s, "mlp → dense")] if s == seeds[0] else []
    teachers: dict[int, RadianceField] = {}
    students: dict[int, RadianceField] = {}
    curves: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for s, arm in sweep(ctx, jobs, label=lambda job: f"seed {job[0]}: {job[1]}"):
        if arm == "teacher":
            teachers[s] = train_teacher(ctx, views, params, s)
            curves[s, arm] = [(params.teacher_seconds, held_out_psnr(lambda p, t=teachers[s]: t(p, False), views))]
        elif arm == "scratch":
            _, curves[s, arm] = scratch_student(ctx, views, params, s)
        elif arm == "mlp → dense":
            _, curves[s, arm] = distilled_student(ctx, students[s], views, params, s, "pvd", "dense")
        else:
            student, curves[s, arm] = distilled_student(ctx, teachers[s], views, params, s, arm)  # type: ignore[arg-type]
            if arm == "pvd":
                students[s] = student

    def final(arm: str, run_seeds: list[int]) -> list[float]:
        return [curves[s, arm][-1][1] for s in run_seeds]

    first = seeds[0]
    panels = {
        "test PSNR (dB)": {
            arm: ([t for t, _ in c], [p for _, p in c])
            for (s, arm), c in curves.items()
            if s == first and arm != "teacher"
        }
    }
    ctx.save_artifact("psnr_vs_seconds.png", curves_figure(panels, "CPU seconds"), kind="plot")
    fields = {"teacher": (teachers[first], False), "pvd": (students[first], True)}
    ctx.save_artifact("test_views.png", views_figure(views, fields), kind="image")
    means = {
        arm: statistics.fmean(c[-1][1] for (s, a), c in curves.items() if a == arm)
        for arm in ("teacher", "scratch", "pvd", "rgb-only", "no-clamp", "mlp → dense")
        if (first, arm) in curves
    }
    note = (
        f"Teacher {params.teacher_seconds:g} CPU s, students {params.seconds:g} CPU s each ({params.rays_per_step} "
        f"rays × {params.samples} samples per step); scratch and PVD on {len(seeds)} seed(s), RGB-only and no-clamp "
        f"on {len(ablation)}, MLP → dense grid on 1 (reported). Test PSNR (dB, mean over seeds): "
        + ", ".join(f"{arm} {v:.2f}" for arm, v in means.items())
        + "."
    )
    return Outcome(
        ours=final("pvd", seeds),
        baseline=final("scratch", seeds),
        margin=1.0,
        checks=(
            Comparison("PVD vs RGB-only distillation", final("pvd", ablation), final("rgb-only", ablation), "higher"),
            Comparison("PVD vs PVD without the clamp", final("pvd", ablation), final("no-clamp", ablation), "higher"),
        ),
        note=note,
        details={
            "test_psnr": means,
            "curves": {f"{s}/{arm}": c for (s, arm), c in curves.items()},
            "seeds": seeds,
            "ablation_seeds": ablation,
        },
    )
