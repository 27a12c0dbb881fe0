"""Reproductions: each method's small offline test of its paper's qualitative claim.

A method module declares one with `@reproduction(...)` over `fn(ctx, seed, smoke) -> Outcome`.
The full configuration fits in a few CPU minutes (`make results`); `smoke=True` runs the same code
path in seconds for CI. The record printed by `crucible reproduce ID --json` has the fields
method, claim, metric, ours, baseline, direction, holds, seconds, seed, seeds, note and details,
and, added here rather than by each reproduction:

- the spread: when a reproduction reports one value per seed for ours and for the baseline, the
  record carries both lists, their means (`ours`, `baseline`) and standard deviations, and the
  standard error of the paired improvement (ours − baseline, signed so that better is positive);
- the verdict, by one rule for every method: the claim's direction **holds** when the mean paired
  improvement exceeds its seed-to-seed standard error, is **reversed** when it falls below minus
  that error, and is **within noise** otherwise (always so for a single seed). A claim's margin
  ("by at least one point", "at least 30% lower", "within one point of") is subtracted from every
  seed's gain before the rule is applied, and its further paired comparisons (`Comparison`: against
  other baselines, or on a second metric) are judged by the same rule, the record's verdict being the
  weakest of them; conditions that are not paired comparisons ("in 4 of 6 settings", "the output is
  exactly greedy decoding's") come as `Outcome.holds`, and the record holds only when they do too;
- provenance (`models.provenance`): the commit, a hash of the code the reproduction ran (its
  module and every `models` module it imports) and of the cached inputs it read, so that a page of
  records can say which of them the current code no longer produced.

Reproductions share their loop: `seeds_for(seed, smoke, n)` is the seed list (one in smoke mode),
and `sweep(ctx, items, label)` iterates over arms or settings with the cancel check, progress and
per-item timing every such loop needs.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from models.context import RunContext, cpu_threads, shared_cache_dir, stop_if_cancelled
from models.provenance import code_fingerprint, current_commit, numerics, recording_inputs
from models.registry import UnknownMethodError, get_method, list_methods, note_reproduction

Direction = Literal["higher", "lower"]
Verdict = Literal["holds", "within noise", "reversed"]
T = TypeVar("T")

FULL_SEEDS = 3  # the fewest seeds a full-configuration record may rest on


@dataclass(frozen=True)
class Comparison:
    """One more comparison a claim makes, over the same paired seeds, judged by the same noise rule.

    `margin` is what the claim asks beyond "better": the paired gain (ours − baseline, signed so that
    better is positive) must exceed it by more than the seed-to-seed standard error. "Beats it by at
    least one point" is margin 0.01; "within one point of it" is margin −0.01; "at least 30% lower" is
    margin 0.3 with `relative` (a fraction of the baseline's value, per seed).
    """

    name: str
    ours: Sequence[float]
    baseline: Sequence[float]
    direction: Direction
    margin: float = 0.0
    relative: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a reproduction measured: our method's and the baseline's value of the claim's metric.

    `ours` and `baseline` are one value per seed (paired: the i-th of each ran with the same seed)
    or a single number when the metric does not decompose by seed (say, a rank correlation over a
    whole sweep); the record then carries no spread and the verdict is "within noise" unless
    `seeds` > 1 runs went into that one number and the reproduction judges `holds` itself.
    `margin`/`relative` state how much better the claim says ours is (as in `Comparison`), and
    `checks` the claim's other comparisons (against further baselines, or on a second metric); each is
    judged over the seeds, and the verdict is the weakest of them. `holds` carries what is left: the
    claim's conditions that are not paired comparisons (None: there are none).
    """

    ours: float | Sequence[float]
    baseline: float | Sequence[float]
    seeds: int | None = None
    holds: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.0  # the claim's margin over the baseline (see `Comparison`)
    relative: bool = False
    checks: tuple[Comparison, ...] = ()  # the claim's further comparisons, judged by the same noise rule

    def per_seed(self) -> tuple[list[float], list[float]] | None:
        """The paired per-seed values, or None when the outcome gives single numbers."""
        if isinstance(self.ours, (int, float)) or isinstance(self.baseline, (int, float)):
            return None
        ours, base = [float(v) for v in self.ours], [float(v) for v in self.baseline]
        if len(ours) != len(base) or not ours:
            raise ValueError(f"per-seed values must pair up: {len(ours)} ours vs {len(base)} baseline")
        return ours, base


@dataclass(frozen=True)
class ReproductionSpec:
    method_id: str
    claim: str
    metric: str
    direction: Direction
    baseline: str
    run: Callable[[RunContext, int, bool], Outcome]
    module: str = ""


_REPRODUCTIONS: dict[str, ReproductionSpec] = {}


def reproduction(
    method_id: str, *, claim: str, metric: str, direction: Direction, baseline: str
) -> Callable[[Callable[[RunContext, int, bool], Outcome]], Callable[[RunContext, int, bool], Outcome]]:
    if direction not in ("higher", "lower"):
        raise ValueError("direction must be 'higher' or 'lower'")

    def register(fn: Callable[[RunContext, int, bool], Outcome]) -> Callable[[RunContext, int, bool], Outcome]:
        _REPRODUCTIONS[method_id] = ReproductionSpec(
            method_id, claim, metric, direction, baseline, fn, module=fn.__module__
        )
        note_reproduction(method_id)
        return fn

    return register


def get_reproduction(method_id: str) -> ReproductionSpec:
    spec = get_method(method_id)  # imports the module that declares both
    try:
        return _REPRODUCTIONS[spec.id]
    except KeyError:
        raise UnknownMethodError(f"{method_id} (reproduction)", sorted(_REPRODUCTIONS)) from None


def list_reproductions(pattern: str = "*") -> list[ReproductionSpec]:
    list_methods()  # discovers every method module, and so every reproduction
    return [r for mid, r in sorted(_REPRODUCTIONS.items()) if fnmatch.fnmatchcase(mid, pattern)]


# -- the loop every reproduction shares ---------------------------------------------------------


def seeds_for(seed: int, smoke: bool, n: int = FULL_SEEDS) -> list[int]:
    """The seeds a reproduction runs: `seed` alone in smoke mode, else `n` consecutive seeds from it."""
    return [seed] if smoke else [seed + i for i in range(n)]


class Sweep(Generic[T]):
    """Iterate over a reproduction's arms, settings or seeds: before each item the cancel check and a
    progress message (its label), after it the item's wall time, kept in `seconds` by label."""

    def __init__(self, ctx: RunContext, items: Iterable[T], label: Callable[[T], str] = str):
        self.ctx, self.items, self.label = ctx, list(items), label
        self.seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        total = len(self.items)
        for i, item in enumerate(self.items):
            stop_if_cancelled(self.ctx)
            name = self.label(item)
            print(f"[reproduction] {name} ({i + 1}/{total})", file=sys.stderr, flush=True)
            self.ctx.progress(i, total, name)
            start = time.perf_counter()
            yield item
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
        self.ctx.progress(total, total, f"{total} done in {sum(self.seconds.values()):.0f} s")


def sweep(ctx: RunContext, items: Iterable[T], label: Callable[[T], str] = str) -> Sweep[T]:
    """`for item in sweep(ctx, items, label): ...`: see `Sweep`."""
    return Sweep(ctx, items, label)


# -- the verdict --------------------------------------------------------------------------------


def compare(ours: float, baseline: float, direction: Direction) -> bool:
    return ours > baseline if direction == "higher" else ours < baseline


def improvement(ours: float, baseline: float, direction: Direction) -> float:
    """ours − baseline, signed so that positive means ours is better in the claim's direction."""
    return ours - baseline if direction == "higher" else baseline - ours


@dataclass(frozen=True)
class SeedStatistics:
    ours_mean: float
    baseline_mean: float
    ours_std: float
    baseline_std: float
    improvement_mean: float
    improvement_se: float
    verdict: Verdict


def seed_statistics(
    ours: Sequence[float],
    baseline: Sequence[float],
    direction: Direction,
    margin: float = 0.0,
    relative: bool = False,
) -> SeedStatistics:
    """Means, spreads and the one verdict rule over paired per-seed values (see the module docstring):
    the gain over the baseline beyond the claim's margin, against its standard error over seeds."""
    n = len(ours)
    if len(baseline) != n or not n:
        raise ValueError(f"per-seed values must pair up: {n} ours vs {len(baseline)} baseline")
    gains = [improvement(o, b, direction) - margin * (abs(b) if relative else 1.0) for o, b in zip(ours, baseline)]
    mean_gain = statistics.fmean(gains)
    se = statistics.stdev(gains) / math.sqrt(n) if n > 1 else math.inf
    verdict: Verdict = "holds" if mean_gain > se else "reversed" if mean_gain < -se else "within noise"
    return SeedStatistics(
        statistics.fmean(ours),
        statistics.fmean(baseline),
        statistics.stdev(ours) if n > 1 else 0.0,
        statistics.stdev(baseline) if n > 1 else 0.0,
        mean_gain,
        se,
        verdict,
    )


VERDICT_ORDER: dict[str, int] = {"reversed": 0, "within noise": 1, "holds": 2}


def judge_check(check: Comparison) -> dict[str, Any]:
    stats = seed_statistics(check.ours, check.baseline, check.direction, check.margin, check.relative)
    return {
        "name": check.name,
        "ours": round(stats.ours_mean, 6),
        "baseline": round(stats.baseline_mean, 6),
        "margin": check.margin,
        "relative": check.relative,
        "gain_beyond_margin": round(stats.improvement_mean, 6),
        "se": round(stats.improvement_se, 6) if math.isfinite(stats.improvement_se) else None,
        "verdict": stats.verdict,
    }


def run_reproduction(spec: ReproductionSpec, ctx: RunContext, seed: int = 0, smoke: bool = False) -> dict[str, Any]:
    """Run one reproduction on `ctx.resources["cpus"]` threads and return its record."""
    start = time.perf_counter()
    # the job's cache, and the home's (the LLM kit keeps its bases under $CRUCIBLE_HOME/cache)
    caches = {shared_cache_dir(ctx), Path(os.environ.get("CRUCIBLE_HOME", ".crucible")) / "cache"}
    cached_before = _cache_entries(caches)
    with cpu_threads(ctx.resources), recording_inputs() as inputs:
        outcome = spec.run(_AnnouncingContext(ctx), seed, smoke)
    built = sorted(_cache_entries(caches) - cached_before)
    if built:
        print(f"[reproduction] built and cached {', '.join(built)}: a rerun skips this", file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "method": spec.method_id,
        "claim": spec.claim,
        "metric": spec.metric,
        "baseline_name": spec.baseline,
        "direction": spec.direction,
    }
    paired = outcome.per_seed()
    if paired is not None:
        stats = seed_statistics(*paired, spec.direction, outcome.margin, outcome.relative)
        seeds = len(paired[0])
        record |= {
            "ours": round(stats.ours_mean, 6),
            "baseline": round(stats.baseline_mean, 6),
            "ours_std": round(stats.ours_std, 6),
            "baseline_std": round(stats.baseline_std, 6),
            "improvement": round(stats.improvement_mean, 6),
            "improvement_se": round(stats.improvement_se, 6) if math.isfinite(stats.improvement_se) else None,
            "per_seed": {"ours": [round(v, 6) for v in paired[0]], "baseline": [round(v, 6) for v in paired[1]]},
        }
        verdict = stats.verdict
        if outcome.margin:
            record["margin"] = {"value": outcome.margin, "relative": outcome.relative}
        if outcome.checks:
            record["checks"] = [judge_check(c) for c in outcome.checks]
            verdict = min([verdict, *(c["verdict"] for c in record["checks"])], key=VERDICT_ORDER.__getitem__)
    else:
        ours, base = float(outcome.ours), float(outcome.baseline)  # type: ignore[arg-type]
        seeds = outcome.seeds or 1
        record |= {"ours": round(ours, 6), "baseline": round(base, 6)}
        # one number: no spread to judge by, so only a reproduction that judged it over its seeds can hold
        better = compare(ours, base, spec.direction)
        verdict = "holds" if better and outcome.holds is not None and seeds > 1 else "within noise"
    holds = verdict == "holds" and outcome.holds is not False
    _log_arms(ctx, spec, outcome)
    module = spec.module or get_method(spec.method_id).module
    record |= {
        "verdict": verdict,
        "conditions": outcome.holds,
        "holds": bool(holds),
        "seconds": round(time.perf_counter() - start, 2),
        # a cold run built trained-once inputs into the cache (a base model, a classifier): its time is
        # the first run's on a fresh machine, not what a rerun takes
        "cold": bool(built),
        "built": built,
        "seed": seed,
        "seeds": seeds,
        "smoke": smoke,
        "note": outcome.note,
        "details": outcome.details,
        "commit": current_commit(),
        "code_hash": code_fingerprint(module).digest,
        "numerics": numerics(),
        "inputs": dict(sorted(inputs.items())),
    }
    return record


def _cache_entries(caches: set[Path]) -> set[str]:
    """The trained-once things in the caches (two levels: `llm-base/<recipe>`, `classifier-….safetensors`),
    so a run can tell what it built; work in progress (`.partial`, `.lock`, checkpoints) is left out."""
    found = set()
    for cache in caches:
        tops = list(cache.iterdir()) if cache.is_dir() else []
        for top in tops:
            for entry in [top, *(top.iterdir() if top.is_dir() else ())]:
                if not any(part in entry.name for part in (".partial", ".lock", ".checkpoint")):
                    found.add(entry.relative_to(cache).as_posix())
    return {e for e in found if not any(other.startswith(e + "/") for other in found)}


class _AnnouncingContext:
    """The job's context, with each new phase of the run written to the log as it starts (a progress
    message's part before its first ':', digits aside: "base model: step 120/3000" → "base model"), so a
    reproduction's log and the CLI say when it begins training a cached base model, instead of a bar that
    sits for minutes."""

    def __init__(self, ctx: RunContext):
        self._ctx, self._phase = ctx, ""

    def progress(self, done: int, total: int, message: str = "") -> None:
        if ":" in message:
            phase = message.split(":", 1)[0].strip()
            if re.sub(r"\d+", "#", phase) != re.sub(r"\d+", "#", self._phase):
                print(f"[reproduction] {phase} …", file=sys.stderr, flush=True)
            self._phase = phase
        self._ctx.progress(done, total, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def _log_arms(ctx: RunContext, spec: ReproductionSpec, outcome: Outcome) -> None:
    """The arms' per-seed values as the job's metrics (step = seed index), so the job page charts what
    the verdict rests on rather than saying the job logged nothing."""
    paired = outcome.per_seed()
    if paired is None:
        ctx.log(
            0,
            **{f"ours: {spec.metric}": float(outcome.ours), f"{spec.baseline}: {spec.metric}": float(outcome.baseline)},
        )  # type: ignore[arg-type]
        return
    for i, (ours, base) in enumerate(zip(*paired)):
        ctx.log(i, **{f"ours: {spec.metric}": ours, f"{spec.baseline}: {spec.metric}": base})
    for check in outcome.checks:
        for i, (ours, base) in enumerate(zip(check.ours, check.baseline)):
            ctx.log(i, **{f"ours: {check.name}": float(ours), f"baseline: {check.name}": float(base)})


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return asdict(outcome)
