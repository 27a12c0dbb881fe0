"""The reproduction harness: one verdict rule over seeds, margins and further comparisons, the shared loop."""

from __future__ import annotations

import pytest

from models.context import Cancelled, InMemoryRunContext
from models.reproduction import (
    Comparison,
    Outcome,
    ReproductionSpec,
    run_reproduction,
    seed_statistics,
    seeds_for,
    sweep,
)


def test_the_rule_has_three_outcomes_judged_against_the_standard_error():
    assert seed_statistics([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], "higher").verdict == "holds"
    assert seed_statistics([0.0, 0.1, -0.1], [1.0, 1.1, 0.9], "higher").verdict == "reversed"
    assert seed_statistics([1.0, 0.0, 0.5], [0.5, 0.5, 0.4], "higher").verdict == "within noise"
    assert seed_statistics([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], "lower").verdict == "holds"
    assert seed_statistics([1.0], [0.0], "higher").verdict == "within noise"  # one seed measures no noise


def test_a_margin_is_subtracted_before_the_rule():
    ours, base = [0.70, 0.71, 0.72], [0.69, 0.70, 0.71]  # one point better on every seed
    assert seed_statistics(ours, base, "higher").verdict == "holds"
    assert seed_statistics(ours, base, "higher", margin=0.02).verdict == "reversed"  # not two points better
    assert seed_statistics(ours, base, "higher", margin=-0.01).verdict == "holds"  # within a point of it
    ece, dml = [0.016, 0.017, 0.018], [0.024, 0.025, 0.026]  # about 32% lower
    assert seed_statistics(ece, dml, "lower", margin=0.3, relative=True).verdict in ("holds", "within noise")
    assert seed_statistics(ece, dml, "lower", margin=0.5, relative=True).verdict == "reversed"


def spec_returning(outcome: Outcome) -> ReproductionSpec:
    return ReproductionSpec("test-counter", "c", "m", "higher", "b", lambda ctx, seed, smoke: outcome)


def test_the_record_takes_the_weakest_of_its_comparisons():
    strong = Outcome(ours=[2.0, 2.1, 1.9], baseline=[1.0, 1.1, 0.9])
    assert run_reproduction(spec_returning(strong), InMemoryRunContext())["verdict"] == "holds"
    check = Comparison("accuracy within a point", [0.5, 0.6, 0.4], [0.9, 0.95, 0.85], "higher", margin=-0.01)
    record = run_reproduction(
        spec_returning(Outcome(ours=strong.ours, baseline=strong.baseline, checks=(check,))), InMemoryRunContext()
    )
    assert record["checks"][0]["verdict"] == "reversed" and record["verdict"] == "reversed"
    assert record["holds"] is False


def test_conditions_beyond_comparisons_can_only_take_a_holding_claim_away():
    record = run_reproduction(
        spec_returning(Outcome(ours=[2.0, 2.1, 1.9], baseline=[1.0, 1.1, 0.9], holds=False)), InMemoryRunContext()
    )
    assert record["verdict"] == "holds" and record["holds"] is False


def test_seeds_and_sweep():
    assert seeds_for(5, smoke=True) == [5] and seeds_for(5, smoke=False) == [5, 6, 7]
    ctx = InMemoryRunContext()
    done = [item for item in sweep(ctx, ["a", "b"], label=str.upper)]
    assert done == ["a", "b"] and ctx.progress_state[:2] == (2, 2)
    ctx = InMemoryRunContext()
    loop = sweep(ctx, ["a", "b", "c"])
    with pytest.raises(Cancelled):
        for item in loop:
            if item == "b":
                ctx.cancel()
    assert set(loop.seconds) == {"a", "b"}


def test_a_run_logs_its_arms_says_what_it_builds_and_tells_cold_from_warm(tmp_path, monkeypatch, capsys):
    """A reproduction job's page charts the per-seed values its verdict rests on, its log names each phase
    as it starts (a cached base model's training included), and its record tells a first (cold) run that
    built cached inputs from a rerun that found them."""
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "home"))
    ctx = InMemoryRunContext()
    ctx.cache_dir = tmp_path / "cache"  # type: ignore[attr-defined]

    def run(ctx, seed, smoke):
        base = ctx.cache_dir / "llm-base" / "recipe"
        if not base.exists():
            for step in range(3):
                ctx.progress(step, 3, f"base model: step {step}/3")
            base.mkdir(parents=True)
        for _ in sweep(ctx, ["dense", "sparse"]):
            pass
        return Outcome(ours=[0.9, 0.8, 0.85], baseline=[0.5, 0.6, 0.55])

    spec = ReproductionSpec("test-counter", "c", "acc", "higher", "dense", run)
    cold = run_reproduction(spec, ctx)
    said = capsys.readouterr().err
    assert said.count("[reproduction] base model …") == 1 and "sparse (2/2)" in said
    assert "built and cached llm-base/recipe" in said
    assert cold["cold"] is True and cold["built"] == ["llm-base/recipe"]
    assert ctx.history("ours: acc") == [(0, 0.9), (1, 0.8), (2, 0.85)]
    assert [v for _, v in ctx.history("dense: acc")] == [0.5, 0.6, 0.55]

    warm = run_reproduction(spec, ctx)
    assert warm["cold"] is False and warm["built"] == []
    assert "base model" not in capsys.readouterr().err
