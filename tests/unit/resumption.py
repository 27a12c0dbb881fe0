"""Run a method whole, then interrupted after an epoch and resumed from its checkpoints, for resume tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.context import InMemoryRunContext
from models.datasets import Dataset


def interrupted_and_resumed(
    run: Callable[[InMemoryRunContext, Any], None], dataset: Dataset, params: Any, seed: int, stop_after: int
) -> tuple[InMemoryRunContext, InMemoryRunContext, InMemoryRunContext]:
    """(whole, crashed, resumed): the crashed run is cancelled once epoch `stop_after` is reported, and the
    resumed one starts from the checkpoints it left, as a re-queued attempt finds them in storage."""
    whole = InMemoryRunContext(dataset=dataset, seed=seed)
    run(whole, params)

    def stop(done: int, total: int, message: str) -> None:
        if done == stop_after:
            crashed.cancel()

    crashed = InMemoryRunContext(dataset=dataset, seed=seed, on_progress=stop)
    run(crashed, params)
    resumed = InMemoryRunContext(dataset=dataset, seed=seed)
    resumed.checkpoints = list(crashed.checkpoints)
    run(resumed, params)
    return whole, crashed, resumed
