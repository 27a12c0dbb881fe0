"""Fitting a radiance field to images, and scoring it: the photometric loop shared by a teacher, a from-scratch
student and any field trained on the scene's views.

A budget is CPU seconds of this process (`time.process_time`, so other processes' load does not shorten it) and/or
a number of steps; evaluation pauses the clock. Each step draws `rays_per_step` random training rays, samples each
at `samples` stratified depths and takes an Adam step on the colour MSE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

from models.context import RunContext, stop_if_cancelled
from models.fields.radiance import RadianceField
from models.fields.rendering import Rays
from models.fields.scene import SceneViews, render

EVAL_SAMPLES = 64


@dataclass(frozen=True)
class Budget:
    """Stop after `seconds` of CPU time or `steps` steps, whichever comes first (0: no such limit)."""

    seconds: float = 0.0
    steps: int = 0
    evaluations: int = 6  # held-out evaluations, evenly spread over the budget


class BudgetClock:
    """Steps within a budget; `due()` says when the next evaluation point is passed; `paused()` stops the clock."""

    def __init__(self, budget: Budget):
        if not budget.seconds and not budget.steps:
            raise ValueError("a budget needs seconds or steps")
        self.budget, self.used, self.step = budget, 0.0, 0
        self._next_eval = 1

    def fraction(self) -> float:
        parts = []
        if self.budget.seconds:
            parts.append(self.used / self.budget.seconds)
        if self.budget.steps:
            parts.append(self.step / self.budget.steps)
        return max(parts)

    def steps(self) -> Iterator[int]:
        while self.fraction() < 1.0:
            start = time.process_time()
            yield self.step
            self.used += time.process_time() - start
            self.step += 1

    def due(self) -> bool:
        """True once per evaluation point (k / evaluations of the budget), and at the end."""
        if self.fraction() >= self._next_eval / self.budget.evaluations or self.fraction() >= 1.0:
            self._next_eval += 1
            return True
        return False


def held_out_psnr(field: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], views: SceneViews) -> float:
    """PSNR (torchmetrics, data range 1) of the rendered test views against the ground truth."""
    rays, truth = views.rays(views.test)
    with torch.no_grad():
        predicted = torch.cat([render(field, rays[i : i + 2048], EVAL_SAMPLES) for i in range(0, len(rays), 2048)])
    return float(peak_signal_noise_ratio(predicted.clamp(0, 1), truth, data_range=1.0))


def random_rays(rays: Rays, colours: torch.Tensor, count: int, generator: torch.Generator) -> tuple[Rays, torch.Tensor]:
    pick = torch.randint(0, len(rays), (count,), generator=generator)
    return rays[pick], colours[pick]


def fit_to_views(
    ctx: RunContext,
    field: RadianceField,
    views: SceneViews,
    budget: Budget,
    seed: int,
    lr: float = 5e-3,
    rays_per_step: int = 512,
    samples: int = 32,
    clamp: bool = False,
) -> list[tuple[float, float]]:
    """Photometric training on the training views; returns (CPU seconds, held-out PSNR) at each evaluation."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(field.parameters(), lr=lr)
    rays, colours = views.rays(views.train)
    clock, curve = BudgetClock(budget), []
    for _ in clock.steps():
        stop_if_cancelled(ctx)
        batch, target = random_rays(rays, colours, rays_per_step, generator)
        loss = F.mse_loss(render(lambda p: field(p, clamp), batch, samples, generator), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if clock.due():
            curve.append((clock.used, held_out_psnr(lambda p: field(p, clamp), views)))
    return finish_curve(curve, clock, lambda: held_out_psnr(lambda p: field(p, clamp), views))


def finish_curve(
    curve: list[tuple[float, float]], clock: BudgetClock, evaluate: Callable[[], float]
) -> list[tuple[float, float]]:
    """The curve with a last point at the budget's end (the loop's last step lands after its last check)."""
    if not curve or curve[-1][0] < clock.used:
        curve.append((clock.used, evaluate()))
    return curve
