"""The shape every compression job shares: load a parent, compress, evaluate, register with lineage.

`load_parent` takes the `model` param (a registered `name@version` or an imported folder; empty means
the cached base model) and refuses architectures without a decoder stack with a specific error (the
service refuses, at submission, a model the method's `model` field says it cannot take).
`register_compressed` saves the HF folder and registers it with its lineage — parent ref, producing
method and job, params — and its metrics (perplexity, packed bytes), so a deployment or a later job
(SquareHead after pruning, EoRA after SquareHead) can follow the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from models.context import RunContext
from models.datasets import load_builtin
from models.llm.base import base_model_name, model_folder
from models.llm.data import split_windows
from models.llm.folder import CausalLM, decoder_layers, load_folder, save_folder
from models.model_params import ModelLayout, model_field
from models.params import StepTrainingParams
from models.registry import MethodParams

# the cached base models, which `model_folder` trains or fetches by these names without their being registered
BASE_NAMES = (base_model_name(smoke=True), base_model_name(smoke=False))


def parent_model_field(layout: ModelLayout) -> Any:
    """The `model` field of a compression method whose walk needs `layout` (see `models.params.model_field`)."""
    return model_field(
        "parent model: a registered name[@version] or an imported folder "
        "(empty: the cached tiny base model; the cached base models' registry names also work unregistered)",
        "causal-lm",
        layout,
        builtin=BASE_NAMES,
    )


class CompressionParams(MethodParams):
    """Fields every compression job has; a method subclasses it. The parent must have the Llama layout unless
    the method redeclares `model` as `parent_model_field("decoder-stack")` (its walk is `decoder_stack`'s, which
    every decoder-only model transformers exposes has)."""

    model: str = parent_model_field("llama")
    calibration_windows: int = Field(32, ge=1, le=4096, description="calibration windows from the train split")
    seq_len: int = Field(256, ge=8, le=8192, description="tokens per calibration and evaluation window")
    eval_windows: int = Field(32, ge=1, le=4096, description="held-out windows from the val split for perplexity")
    output_name: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})?$",
        description="name to register the result under (empty: <parent>-<method>)",
    )


class CompressionTuningParams(CompressionParams, StepTrainingParams):
    """A compression job that also fine-tunes (SquareHead, PAT): the parent and windows of `CompressionParams` and
    the step schedule of `StepTrainingParams` (lr, batch_size in windows, weight_decay, steps)."""


@dataclass
class Parent:
    lm: CausalLM
    ref: str


@dataclass
class TokenSets:
    calibration: torch.Tensor  # [N, L] windows from the train split
    evaluation: torch.Tensor  # [N, L] windows from the val split


def load_parent(ctx: RunContext, ref: str, smoke: bool = False) -> Parent:
    """The model to compress (`models.llm.base.model_folder` resolves `ref`), checked to have a decoder stack
    (UnsupportedArchitectureError otherwise)."""
    lm = load_folder(model_folder(ctx, ref, smoke))
    decoder_layers(lm.model)
    return Parent(lm, ref or base_model_name(smoke))


def token_sets(ctx: RunContext, lm: CausalLM, params: CompressionParams, calibration_block: int = 0) -> TokenSets:
    """Calibration windows (train split) and evaluation windows (val split) of `ctx.dataset`, or of stdlib-code.
    Calibration takes the `calibration_block`-th disjoint block of `calibration_windows` windows from the start of
    the train split (0: the first windows, what a job uses; a reproduction's seeds may each take their own)."""
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    limit = getattr(lm.model.config, "max_position_embeddings", params.seq_len)
    seq_len = min(params.seq_len, limit)
    n = params.calibration_windows
    return TokenSets(
        split_windows(lm.tokenizer, ds.train["text"], seq_len, n * (calibration_block + 1))[n * calibration_block :],
        split_windows(lm.tokenizer, ds.val["text"], seq_len, params.eval_windows),
    )


def model_stem(ref: str) -> str:
    """A registry-safe stem for names derived from a parent: `name@3` → `name`, `/x/y/folder` → `folder`."""
    return Path(ref.partition("@")[0]).name[:80] or "model"


def register_compressed(
    ctx: RunContext,
    lm: CausalLM,
    parent_ref: str | None,
    method_id: str,
    params: MethodParams,
    metrics: Mapping[str, float],
    name: str = "",
    extra: Mapping[str, Any] | None = None,
    subfolders: Mapping[str, Callable[[Path], Any]] | None = None,
) -> str:
    """Save `lm` as an HF folder and register it; the lineage names parent, method, job, params and metrics.
    `subfolders` writes extra parts (e.g. a peft adapter) into named subfolders before registration."""
    name = name or f"{model_stem(parent_ref or method_id)}-{method_id}"
    lineage = {
        "parent": parent_ref,
        "method": method_id,
        "job_id": ctx.job_id,
        "seed": ctx.seed,
        "params": params.model_dump(),
        "metrics": dict(metrics),
        **dict(extra or {}),
    }
    folder = save_folder(lm.model, lm.tokenizer, ctx.workdir / "registered" / name, lineage)
    for sub, write in (subfolders or {}).items():
        write(folder / sub)
    return ctx.register_model(name, folder, lineage)
