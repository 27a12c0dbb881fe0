"""Reproductions: each method's small offline test of its paper's qualitative claim.

A method module declares one with `@reproduction(...)` over `fn(ctx, seed, smoke) -> Outcome`.
The full configuration fits in a few CPU minutes (`make results`); `smoke=True` runs the same code
path in seconds for CI. The record printed by `crucible reproduce ID --json` is the DESIGN.md
shape: method, claim, metric, ours, baseline, direction, holds, seconds, seed (+ seeds, note).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from models.context import RunContext
from models.registry import register_reproduction

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Outcome:
    """What a reproduction measured: our method's and the baseline's value of the claim's metric.

    `holds` is left to the reproduction when the claim is more than "ours beats baseline" (e.g.
    "within 1 point of the best in 4 of 6 settings"); otherwise it is the direction's comparison.
    """

    ours: float
    baseline: float
    seeds: int = 1
    holds: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReproductionSpec:
    method_id: str
    claim: str
    metric: str
    direction: Direction
    baseline: str
    run: Callable[[RunContext, int, bool], Outcome]


def reproduction(
    method_id: str, *, claim: str, metric: str, direction: Direction, baseline: str
) -> Callable[[Callable[[RunContext, int, bool], Outcome]], Callable[[RunContext, int, bool], Outcome]]:
    if direction not in ("higher", "lower"):
        raise ValueError("direction must be 'higher' or 'lower'")

    def register(fn: Callable[[RunContext, int, bool], Outcome]) -> Callable[[RunContext, int, bool], Outcome]:
        register_reproduction(ReproductionSpec(method_id, claim, metric, direction, baseline, fn))
        return fn

    return register


def compare(ours: float, baseline: float, direction: Direction) -> bool:
    return ours > baseline if direction == "higher" else ours < baseline


def run_reproduction(spec: ReproductionSpec, ctx: RunContext, seed: int = 0, smoke: bool = False) -> dict[str, Any]:
    """Run one reproduction and return its record."""
    start = time.perf_counter()
    outcome = spec.run(ctx, seed, smoke)
    holds = outcome.holds if outcome.holds is not None else compare(outcome.ours, outcome.baseline, spec.direction)
    return {
        "method": spec.method_id,
        "claim": spec.claim,
        "metric": spec.metric,
        "baseline_name": spec.baseline,
        "ours": round(float(outcome.ours), 6),
        "baseline": round(float(outcome.baseline), 6),
        "direction": spec.direction,
        "holds": bool(holds),
        "seconds": round(time.perf_counter() - start, 2),
        "seed": seed,
        "seeds": outcome.seeds,
        "smoke": smoke,
        "note": outcome.note,
        "details": outcome.details,
    }


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return asdict(outcome)
