"""Run a method whole, then interrupted after an epoch and resumed from its checkpoints, for resume tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.context import InMemoryRunContext
from models.datasets import Dataset
from models.registry import MethodSpec, get_method, registered_spec

Runnable = str | MethodSpec | Callable[[InMemoryRunContext, Any], None]


def spec_for(method: Runnable) -> MethodSpec:
    """The registered spec of a method id, a spec, or a method's `run` function."""
    if isinstance(method, MethodSpec):
        return method
    return get_method(method) if isinstance(method, str) else registered_spec(method)


def interrupted_and_resumed(
    method: Runnable, dataset: Dataset | None, params: Any, seed: int, stop_after: int
) -> tuple[InMemoryRunContext, InMemoryRunContext, InMemoryRunContext]:
    """(whole, crashed, resumed): the crashed run is cancelled once epoch `stop_after` is reported, and the
    resumed one starts from the checkpoints it left, as a re-queued attempt finds them in storage. Every run
    goes through `MethodSpec.invoke`, as the job runner's do."""
    spec = spec_for(method)
    whole = InMemoryRunContext(dataset=dataset, seed=seed)
    assert spec.invoke(whole, params)

    def stop(done: int, total: int, message: str) -> None:
        if done == stop_after:
            crashed.cancel()

    crashed = InMemoryRunContext(dataset=dataset, seed=seed, on_progress=stop)
    assert not spec.invoke(crashed, params), f"{spec.id} ran to the end although cancelled at {stop_after}"
    resumed = InMemoryRunContext(dataset=dataset, seed=seed)
    resumed.checkpoints = list(crashed.checkpoints)
    assert spec.invoke(resumed, params)
    return whole, crashed, resumed
