"""What a deployment serves: its kind (detected from the folder) and its engine options (validated at creation).

Options are checked when the deployment is created, so a typo (`max_n_tokens`) or an impossible
value fails then with a 422 naming `/engine/<field>`, not in the middle of a generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.problems import Problem, field_problem, validation_problem

KINDS = ("llm", "diffusion")


class LLMEngine(BaseModel):
    """Caps and defaults of a language-model deployment (requests above a cap get a 422 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights' dtype in memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when the server has one")
    max_tokens_cap: int = Field(512, ge=1, le=32768, description="largest `max_tokens` a request may ask")
    default_max_tokens: int = Field(64, ge=1, le=32768, description="`max_tokens` when a request gives none")
    max_n: int = Field(4, ge=1, le=64, description="largest `n` (choices per request)")
    attention: Literal["sdpa", "hip", "hyperattention"] = Field(
        "sdpa", description="prefill attention: exact SDPA, HiP (hierarchical top-k) or HyperAttention (LSH + sampling)")
    attention_options: dict[str, Any] = Field(
        default_factory=dict, description="the sparse attention's parameters (HiPConfig / HyperConfig fields), "
                                          "e.g. {\"top_k\": 64, \"window\": 32}")


def attention_config(engine: dict[str, Any]) -> Any:
    """The sparse-attention config of an engine (None for exact SDPA); unknown or bad fields → 422."""
    import dataclasses

    name = engine.get("attention", "sdpa")
    if name == "sdpa":
        if engine.get("attention_options"):
            raise field_problem("/engine/attention_options", "exact SDPA takes no options; pick attention hip or "
                                "hyperattention, or drop the options")
        return None
    if name == "hip":
        from models.llm.attention.hip import HiPConfig as Config
    else:
        from models.llm.attention.hyperattention import HyperConfig as Config
    fields = {f.name: f for f in dataclasses.fields(Config)}
    options = dict(engine.get("attention_options") or {})
    for key, value in options.items():
        if key not in fields:
            raise field_problem(f"/engine/attention_options/{key}",
                                f"{name} has no option {key!r}; use {', '.join(sorted(fields))}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise field_problem(f"/engine/attention_options/{key}", "use a non-negative integer")
    return Config(**options)


class DiffusionEngine(BaseModel):
    """Caps and defaults of an image deployment."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(100, ge=1, le=1000, description="largest `steps` a request may ask")
    max_n: int = Field(8, ge=1, le=64, description="largest `n` (images per request)")
    default_sampler: str = Field("ddim", max_length=32)
    default_steps: int = Field(30, ge=1, le=1000)


ENGINES: dict[str, type[BaseModel]] = {"llm": LLMEngine, "diffusion": DiffusionEngine}


def detect_kind(folder: Path) -> str:
    """`llm` for a Hugging Face folder (config.json at the top), `diffusion` for a diffusers folder."""
    from models.diffusion.model import INFO_FILE

    if (folder / "model_index.json").is_file() or (folder / INFO_FILE).is_file() or (folder / "unet").is_dir():
        return "diffusion"
    if (folder / "config.json").is_file():
        return "llm"
    raise Problem(422, "not-servable", "The model cannot be served",
                  "model: the folder has neither config.json (a Hugging Face language model) nor model_index.json / "
                  "unet/ (a diffusers model); register a model folder of one of those kinds",
                  errors=[{"pointer": "/model", "message": "not a language-model or diffusion folder"}])


def validate_engine(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in; unknown or invalid options → 422 naming `/engine/<field>`."""
    try:
        engine = ENGINES[kind].model_validate(options).model_dump()
    except ValidationError as exc:
        raise validation_problem(list(exc.errors()), prefix="/engine") from None
    if engine.get("device") == "cuda" and not torch.cuda.is_available():
        raise field_problem("/engine/device", "this server has no CUDA GPU; use cpu or auto")
    if kind == "llm":
        attention_config(engine)  # fails now, at creation, not in the middle of a generation
    return engine


def resolve_device(engine: dict[str, Any]) -> str:
    device = engine.get("device", "auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
