"""What a deployment serves: its kind (detected from the folder) and its engine options (validated at creation).

Options are checked when the deployment is created, so a typo (`max_n_tokens`) or an impossible
value fails then with a 422 naming `/engine/<field>`, not in the middle of a generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import EngineOptionsInvalid, InvalidField, NotServable

KINDS = ("llm", "diffusion")
DEFAULT_REQUEST_TOKENS = 8192  # 4 prompts × n 4 × 512 tokens: the default caps, four prompts at a time


class LLMEngine(BaseModel):
    """Caps and defaults of a language-model deployment (requests above a cap get a 422 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights' dtype in memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when the server has one")
    max_tokens_cap: int = Field(512, ge=1, le=32768, description="largest `max_tokens` a request may ask")
    default_max_tokens: int = Field(64, ge=1, le=32768, description="`max_tokens` when a request gives none")
    max_n: int = Field(4, ge=1, le=64, description="largest `n` (choices per request)")
    max_request_tokens: int = Field(
        DEFAULT_REQUEST_TOKENS,
        ge=1,
        le=1_048_576,
        description="largest prompts × n × max_tokens of one request: the most tokens it may make the model "
        "generate, however many prompts it lists",
    )
    attention: Literal["sdpa", "hip", "hyperattention"] = Field(
        "sdpa", description="prefill attention: exact SDPA, HiP (hierarchical top-k) or HyperAttention (LSH + sampling)"
    )
    attention_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the sparse attention's parameters (HiPConfig / HyperConfig fields), "
        'e.g. {"top_k": 64, "window": 32}',
    )
    kv_cache: Literal["none", "ems", "matryoshka-kv"] = Field(
        "none",
        description="KV-cache compression: none, EMS-style evict-then-merge at prefill (a per-head budget), "
        "or MatryoshkaKV low-rank keys/values (needs a model registered by a matryoshka-kv job)",
    )
    kv_cache_options: dict[str, Any] = Field(
        default_factory=dict,
        description='ems: {"budget": slots per head (required), "window", "kernel", '
        '"tau"}; matryoshka-kv: {"fraction": a searched KV budget of the '
        'model, e.g. 0.5} or {"rank": a uniform rank}',
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="sequences in the continuous decode batch; every decode step runs this many rows (padding "
        "included), so a sequence's output never depends on what else is in the batch",
    )
    prefill_chunk: int = Field(
        128, ge=1, le=32768, description="prompt tokens prefilled per step: the most a joining prompt stalls the batch"
    )
    max_queue: int = Field(
        64, ge=0, le=65536, description="sequences waiting to join the batch; a request past it gets a 429"
    )
    decoding: Literal["standard", "ppd"] = Field(
        "standard",
        description="ppd: parallel prompt decoding with the model's trained prompt tokens (a model "
        "registered by a ppd job); exactly greedy decoding's text in fewer forward passes, so "
        "it applies to temperature-0 requests (others decode normally)",
    )


def attention_config(engine: dict[str, Any]) -> Any:
    """The sparse-attention config of an engine (None for exact SDPA); unknown or bad fields → 422."""
    import dataclasses

    name = engine.get("attention", "sdpa")
    if name == "sdpa":
        if engine.get("attention_options"):
            raise InvalidField(
                "/engine/attention_options",
                "exact SDPA takes no options; pick attention hip or hyperattention, or drop the options",
            )
        return None
    if name == "hip":
        from models.llm.attention.hip import HiPConfig as Config
    else:
        from models.llm.attention.hyperattention import HyperConfig as Config
    fields = {f.name: f for f in dataclasses.fields(Config)}
    options = dict(engine.get("attention_options") or {})
    for key, value in options.items():
        if key not in fields:
            raise InvalidField(
                f"/engine/attention_options/{key}", f"{name} has no option {key!r}; use {', '.join(sorted(fields))}"
            )
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidField(f"/engine/attention_options/{key}", "use a non-negative integer")
    return Config(**options)


EMS_OPTIONS = {"budget": int, "window": int, "kernel": int, "tau": float}


def _check_number(pointer: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or (kind is int and value < 1):
        raise InvalidField(pointer, "use a positive integer" if kind is int else "use a number")


def kv_cache_config(engine: dict[str, Any], folder: Path | None = None, context: int | None = None) -> Any:
    """What `engine.kv_cache` asks for, checked: None (no compression), an `EMS` press, or a MatryoshkaKV
    (projection, rank_k, rank_v). With the model `folder` (and its `context`), also what only the model can say:
    a budget at least the context, a folder with no trained projection, a fraction it has no ranks for → 422."""
    name = engine.get("kv_cache", "none")
    options = dict(engine.get("kv_cache_options") or {})
    if name == "none":
        if options:
            raise InvalidField(
                "/engine/kv_cache_options",
                "kv_cache none takes no options; pick kv_cache ems or matryoshka-kv, or drop the options",
            )
        return None
    if name == "ems":
        for key, value in options.items():
            if key not in EMS_OPTIONS:
                raise InvalidField(
                    f"/engine/kv_cache_options/{key}", f"ems has no option {key!r}; use {', '.join(EMS_OPTIONS)}"
                )
            _check_number(f"/engine/kv_cache_options/{key}", value, EMS_OPTIONS[key])
        if "budget" not in options:
            raise InvalidField(
                "/engine/kv_cache_options/budget", 'ems needs a budget: KV slots kept per head, e.g. {"budget": 64}'
            )
        if context is not None and options["budget"] >= context:
            raise InvalidField(
                "/engine/kv_cache_options/budget",
                f"a budget of {options['budget']} slots keeps the model's whole {context}-token "
                "context; use a smaller budget or kv_cache none",
            )
        from models.llm.kv_cache.ems import EMS

        return EMS(**options)
    if engine.get("attention", "sdpa") != "sdpa":
        raise InvalidField(
            "/engine/kv_cache",
            "matryoshka-kv attends through its own projected attention and "
            f"cannot be combined with attention {engine['attention']!r}; use attention sdpa",
        )
    unknown = set(options) - {"fraction", "rank"}
    if unknown or len(options) > 1:
        key = sorted(unknown)[0] if unknown else "rank"
        raise InvalidField(
            f"/engine/kv_cache_options/{key}",
            "matryoshka-kv takes one of fraction (a searched budget) or rank (uniform)",
        )
    for key, value in options.items():
        _check_number(f"/engine/kv_cache_options/{key}", value, float if key == "fraction" else int)
    if folder is None:
        return None
    from models.llm.kv_cache.matryoshka import load_projection

    try:
        projection, tables = load_projection(folder)
    except (FileNotFoundError, OSError, KeyError, ValueError):
        raise InvalidField(
            "/engine/kv_cache",
            "this model has no trained KV projection; run a matryoshka-kv job on it and deploy the model it registers",
        ) from None
    head_dim = projection.shape[2]
    if "rank" in options:
        if options["rank"] > head_dim:
            raise InvalidField("/engine/kv_cache_options/rank", f"at most the head dimension, {head_dim}")
        return projection, options["rank"], options["rank"]
    if not options:
        return projection, head_dim, head_dim
    key = f"{options['fraction']:g}"
    if key not in tables:
        raise InvalidField(
            "/engine/kv_cache_options/fraction",
            f"this model has ranks for fractions {', '.join(sorted(tables)) or 'none'}; use one "
            "of them or a uniform rank",
        )
    return projection, *tables[key]


class DiffusionEngine(BaseModel):
    """Caps and defaults of an image deployment."""

    model_config = ConfigDict(extra="forbid")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when the server has one")
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
    raise NotServable(
        "model: the folder has neither config.json (a Hugging Face language model) nor model_index.json / "
        "unet/ (a diffusers model); register a model folder of one of those kinds",
        [{"pointer": "/model", "message": "not a language-model or diffusion folder"}],
    )


def check_decoding(engine: dict[str, Any], folder: Path | None = None) -> None:
    """PPD verifies its guesses with its own attention mask and crops a plain KV cache: it needs exact attention and
    an uncompressed cache, and the prompt tokens a ppd job trained for this model."""
    if engine.get("decoding", "standard") != "ppd":
        return
    for option, plain in (("attention", "sdpa"), ("kv_cache", "none")):
        if engine.get(option, plain) != plain:
            raise InvalidField(
                "/engine/decoding",
                f"ppd verifies candidates with exact attention over a full KV "
                f"cache; it cannot be combined with {option} {engine[option]!r} (use {plain})",
            )
    from models.llm.parallel_prompt import PROMPTS_FILE

    if folder is not None and not (Path(folder) / PROMPTS_FILE).is_file():
        raise InvalidField(
            "/engine/decoding",
            "this model has no trained PPD prompt tokens; run a ppd job on it and deploy the model it registers",
        )


def fit_context(engine: dict[str, Any], given: dict[str, Any], context: int | None, strict: bool = True) -> None:
    """Token caps the model can meet: a prompt takes at least one token of the model's `context`, so
    `max_tokens_cap` is at most context - 1. A cap asked above it is a 422 at creation (`strict`); a default
    is clamped to it, and `default_max_tokens` to the cap."""
    if context is not None and context > 1 and engine["max_tokens_cap"] > context - 1:
        if strict and "max_tokens_cap" in given:
            raise InvalidField(
                "/engine/max_tokens_cap",
                f"this model's context is {context} tokens and a prompt takes at least one: at most {context - 1}",
            )
        engine["max_tokens_cap"] = context - 1
    if engine["default_max_tokens"] > engine["max_tokens_cap"]:
        if strict and "default_max_tokens" in given:
            raise InvalidField(
                "/engine/default_max_tokens", f"at most max_tokens_cap ({engine['max_tokens_cap']} here)"
            )
        engine["default_max_tokens"] = engine["max_tokens_cap"]


def validate_engine(
    kind: str, options: dict[str, Any], folder: Path | None = None, *, strict: bool = True
) -> dict[str, Any]:
    """The options with defaults filled in; unknown or invalid options → 422 naming `/engine/<field>`. With the
    model's `folder`, also the checks only the model can answer (caps and a KV budget vs its context, a trained
    projection). `strict=False` (a request's engine, over a deployment's stored one) clamps caps instead."""
    try:
        engine = ENGINES[kind].model_validate(options).model_dump()
    except ValidationError as exc:
        raise EngineOptionsInvalid(list(exc.errors()), prefix="/engine") from None
    if engine.get("device") == "cuda" and not torch.cuda.is_available():
        raise InvalidField("/engine/device", "this server has no CUDA GPU; use cpu or auto")
    if kind == "llm":
        fit_context(engine, options, model_context(folder) if folder is not None else None, strict)
        attention_config(engine)  # fails now, at creation, not in the middle of a generation
        kv_cache_config(engine, folder, model_context(folder) if folder is not None else None)
        check_decoding(engine, folder)
    return engine


PER_REQUEST = ("kv_cache", "kv_cache_options", "decoding", "attention")


def request_engine(deployment: dict[str, Any], override: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    """The engine one request runs with: the deployment's, with the request's `engine` overrides (KV cache and
    its options, decoding, and attention switched back to exact SDPA or kept), checked exactly as at deployment
    creation, so an option the model cannot take is a 4xx naming `/engine/<field>` before anything runs.
    Caps, dtype and device belong to the deployment (they size its memory), as do sparse-attention options."""
    if not override:
        return deployment
    for key in override:
        if key not in PER_REQUEST:
            raise InvalidField(
                f"/engine/{key}",
                f"a request can set {', '.join(PER_REQUEST)}; {key!r} belongs to "
                "the deployment (create another deployment to change it)",
            )
    attention = override.get("attention", deployment.get("attention", "sdpa"))
    if attention not in ("sdpa", deployment.get("attention", "sdpa")):
        raise InvalidField(
            "/engine/attention",
            f"this deployment runs {deployment.get('attention', 'sdpa')!r} "
            "attention; a request can keep it or ask for exact 'sdpa'",
        )
    merged = {**deployment, **override}
    if "kv_cache" in override and "kv_cache_options" not in override:
        merged["kv_cache_options"] = {}  # another compression's options do not carry over
    if attention == "sdpa":
        merged["attention_options"] = {}
    return validate_engine("llm", merged, folder, strict=False)


def model_context(folder: Path) -> int | None:
    """max_position_embeddings from a HF folder's config.json (None when it does not say)."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def resolve_device(engine: dict[str, Any]) -> str:
    device = engine.get("device", "auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
