"""The demo's compression chain registers each stage with lineage to the previous one."""

from __future__ import annotations

import math

import torch

from models.context import InMemoryRunContext
from models.llm.folder import read_lineage
from models.llm.pipeline import compress_pipeline

torch.set_num_threads(1)


def test_pipeline_registers_pruned_tuned_and_compensated_models(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    ctx = InMemoryRunContext()
    stages = compress_pipeline(ctx, smoke=True, steps=2)
    assert [s.name for s in stages] == ["dense", "pruned", "squarehead", "eora"]
    assert all(math.isfinite(s.val_ppl) and s.val_ppl > 1 for s in stages)
    lineage = read_lineage(ctx.load_model(stages[-1].ref))
    assert lineage["method"] == "eora" and lineage["compressed_from"] == stages[2].ref
    assert read_lineage(ctx.load_model(stages[2].ref))["parent"] == stages[0].ref
