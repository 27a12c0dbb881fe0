"""Every registered reproduction runs in smoke mode and returns a well-formed record (holds not judged)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.context import InMemoryRunContext
from models.reproduction import list_reproductions, run_reproduction

torch.set_num_threads(1)

RECORD_KEYS = {
    "method",
    "claim",
    "metric",
    "baseline_name",
    "ours",
    "baseline",
    "direction",
    "holds",
    "seconds",
    "seed",
    "seeds",
    "smoke",
    "note",
    "details",
}


@pytest.mark.parametrize("spec", list_reproductions(), ids=lambda spec: spec.method_id)
def test_reproduction_smoke_run_returns_a_complete_record(spec):
    ctx = InMemoryRunContext(seed=1)
    record = run_reproduction(spec, ctx, seed=1, smoke=True)
    assert RECORD_KEYS <= set(record)
    assert record["method"] == spec.method_id and record["smoke"] is True and record["seed"] == 1
    assert record["direction"] in ("higher", "lower") and isinstance(record["holds"], bool)
    assert math.isfinite(record["ours"]) and math.isfinite(record["baseline"])
    assert record["seeds"] >= 1 and record["seconds"] >= 0
    json.dumps(record)  # `crucible reproduce --json` prints it as is
    assert all(kind in ("plot", "table", "json", "image", "text", "file") for kind, _ in ctx.artifacts.values())
