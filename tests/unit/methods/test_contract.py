"""The method contract, checked for every registered method.

Each method declares `tiny` params (and, where its kind's first built-in dataset does not fit, a
`tiny_dataset`) for a seconds-long run. With them, every method must: validate its default params
and list them in `crucible methods --json`; run to the end under `InMemoryRunContext`, logging at
least one metric; stop when cancelled mid-run (the first progress report before the end asks it to),
returning cleanly through `MethodSpec.invoke` rather than finishing its work; and, when its params
offer `checkpoint_every`, end an interrupted-then-resumed run with the same final metrics, the same
last checkpoint and the same registered weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from api.cli import main
from models.checkpoint import Checkpoint
from models.context import InMemoryRunContext
from models.datasets import Dataset, load_builtin
from models.registry import MethodSpec, list_methods

SPECS = list_methods()
RESUMABLE = [s for s in SPECS if "checkpoint_every" in s.params.model_fields]
# the built-in dataset a method of each kind runs on, unless it names its own `tiny_dataset`
BUILTIN_FOR_KIND = {"image-class": "digits", "tabular": "synthetic-tabular", "text-corpus": "stdlib-code"}
# metrics that measure the machine, not the run: they differ between two identical runs
TIMING_WORDS = ("second", "time", "latency", "throughput", "per_s", "tok_s", "speed")


def ids(spec: MethodSpec) -> str:
    return spec.id


def dataset_for(spec: MethodSpec) -> Dataset | None:
    if spec.tiny_dataset:
        return load_builtin(spec.tiny_dataset)
    return load_builtin(BUILTIN_FOR_KIND[spec.datasets[0]]) if spec.datasets else None


def context(spec: MethodSpec, seed: int = 0) -> InMemoryRunContext:
    if not spec.tiny:
        pytest.fail(f"{spec.id} declares no tiny params (@method(..., tiny=...)); its defaults are minutes long")
    return InMemoryRunContext(dataset=dataset_for(spec), seed=seed)


def final_metrics(ctx: InMemoryRunContext) -> dict[str, float]:
    """Each metric's value at its last step, leaving out timings."""
    last: dict[str, tuple[int, float]] = {}
    for point in ctx.metrics:
        if any(word in point.name for word in TIMING_WORDS):
            continue
        if point.name not in last or point.step >= last[point.name][0]:
            last[point.name] = (point.step, point.value)
    return {name: value for name, (_, value) in last.items()}


def same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def tensors_of(checkpoint: Checkpoint | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("", checkpoint.state if checkpoint is not None else {})
    return out


def registered_weights(ctx: InMemoryRunContext) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, versions in ctx.models.items():
        for path in sorted(versions[-1].rglob("*.safetensors")):
            for key, tensor in load_file(str(path)).items():
                out[f"{name}/{path.relative_to(versions[-1]).as_posix()}/{key}"] = tensor
    return out


def test_every_method_declares_tiny_params():
    missing = [s.id for s in SPECS if not s.tiny]
    assert not missing, f"declare tiny params in @method(..., tiny=...) for {missing}"


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_default_params_validate_and_are_listed(spec: MethodSpec):
    spec.validate({})
    spec.validate(spec.tiny)
    listed = {m["id"]: m for m in json.loads(CliRunner().invoke(main, ["methods", spec.id, "--json"]).stdout)}
    assert listed[spec.id]["params"] == spec.params_schema()
    assert listed[spec.id]["family"] == spec.family and listed[spec.id]["task"] == spec.task


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_tiny_run_logs_a_metric_and_finishes(spec: MethodSpec):
    ctx = context(spec)
    assert spec.invoke(ctx, spec.tiny), f"{spec.id} stopped as if cancelled"
    assert ctx.metrics, f"{spec.id} logged no metric"
    assert all(math.isfinite(p.value) or math.isnan(p.value) for p in ctx.metrics)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_cancel_mid_run_returns_cleanly(spec: MethodSpec):
    ctx = context(spec)
    reports: list[tuple[int, int]] = []

    def cancel_on_first_report(done: int, total: int, message: str) -> None:
        reports.append((done, total))
        if total and done < total:
            ctx.cancel()

    ctx.on_progress = cancel_on_first_report
    finished = spec.invoke(ctx, spec.tiny)
    assert reports, f"{spec.id} reported no progress before the end"
    assert ctx.cancelled() and not finished, f"{spec.id} ran to the end although cancelled at {reports[0]}"


@pytest.mark.parametrize("spec", RESUMABLE, ids=ids)
def test_interrupted_and_resumed_run_ends_as_an_uninterrupted_one(spec: MethodSpec):
    params = {**spec.tiny, "checkpoint_every": 1}
    whole = context(spec, seed=3)
    assert spec.invoke(whole, params)

    crashed = context(spec, seed=3)

    def crash_after_first_checkpoint(done: int, total: int, message: str) -> None:
        if crashed.checkpoints and total and done < total:
            crashed.cancel()

    crashed.on_progress = crash_after_first_checkpoint
    assert not spec.invoke(crashed, params), f"{spec.id} was not interrupted (no checkpoint before the end?)"
    assert crashed.checkpoints, f"{spec.id} saved no checkpoint with checkpoint_every=1"

    resumed = context(spec, seed=3)
    resumed.checkpoints = list(crashed.checkpoints)
    assert spec.invoke(resumed, params)

    expected, got = final_metrics(whole), final_metrics(resumed)
    assert got, f"{spec.id} logged nothing after resuming"
    differ = {k: (expected.get(k), v) for k, v in got.items() if k not in expected or not same_number(expected[k], v)}
    assert not differ, f"{spec.id}: resumed final metrics differ: {differ}"
    for label, a, b in (
        ("last checkpoint", tensors_of(whole.load_checkpoint()), tensors_of(resumed.load_checkpoint())),
        ("registered weights", registered_weights(whole), registered_weights(resumed)),
    ):
        assert a.keys() == b.keys(), f"{spec.id}: {label} hold different tensors"
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{spec.id}: {label} differ in {unequal[:5]}"
