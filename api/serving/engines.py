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
    return engine


def resolve_device(engine: dict[str, Any]) -> str:
    device = engine.get("device", "auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
