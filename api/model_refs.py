"""Models a job's params name, checked at submission as a deployment checks its model at creation.

A method's params declare which fields name a model and what it must be (`models.params.model_field`: a
causal LM or a diffusers model, and for a causal LM the decoder layout the method walks). Here each such
field of a submitted job is resolved the way the job would resolve it (a registered `name[@version]` of the
project, a folder under an import root, or a built-in name the method loads itself) and its config is read
(config.json from the object store: a few kilobytes, never the weights), so a job that names a missing
model, an image model for a language-model method or a GPT-NeoX model for a Llama-only method is a 422
naming `/params/<field>` and saying what the method needs, not a job that fails minutes later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.problems import Problem, field_problem
from models.diffusion.model import INFO_FILE
from models.model_params import MODEL_KIND_WORDS, MODEL_LAYOUT_WORDS, model_fields
from models.registry import MethodSpec
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import RegisteredModel

DIFFUSERS_MARKERS = ("model_index.json", INFO_FILE)  # a diffusers pipeline's index, or our own parts' info


def find_registered(session: Session, project: str, ref: str) -> RegisteredModel | None:
    """The row `name`, `name@latest` or `name@N` names in the project's registry (None: no such model)."""
    name, _, version = ref.partition("@")
    q = select(RegisteredModel).where(RegisteredModel.project == project, RegisteredModel.name == name)
    if version in ("", "latest"):
        q = q.order_by(RegisteredModel.version.desc())
    elif version.isdigit() and int(version) < 2**31:
        q = q.where(RegisteredModel.version == int(version))
    else:
        return None
    return session.scalars(q.limit(1)).first()


def model_not_found(ref: str, pointer: str) -> Problem:
    """The 404 of a model reference that names no registered model of the project."""
    return Problem(
        404,
        "model-not-found",
        "No such model",
        f"{pointer.lstrip('/')}: no registered model {ref!r} in this project; see /api/v1/models",
        errors=[{"pointer": pointer, "message": f"no registered model {ref!r}"}],
    )


def _kind_of(names: set[str]) -> str:
    if any(n in names for n in DIFFUSERS_MARKERS) or any(n.startswith("unet/") for n in names):
        return "diffusers"
    return "causal-lm" if "config.json" in names else "unknown"


def _resolve(
    session: Session, settings: Settings, store: ObjectStore, project: str, ref: str, pointer: str
) -> tuple[str, dict[str, Any] | None]:
    """(kind, config.json of a causal LM) of the model `ref` names; a 422 naming `pointer` when there is none."""
    if Path(ref).is_absolute():
        roots = settings.import_root_paths
        folder = Path(ref).resolve()
        if not any(folder.is_relative_to(r) for r in roots) or not folder.is_dir():
            raise field_problem(
                pointer,
                f"{ref} is not a model folder under an import root (CRUCIBLE_IMPORT_ROOTS); put it there or "
                "register it with POST /api/v1/models",
                slug="model-not-found",
                title="No such model",
            )
        names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        kind = _kind_of(names)
        try:
            config = json.loads((folder / "config.json").read_text()) if kind == "causal-lm" else None
        except (OSError, ValueError):
            raise _needs(pointer, f"the config.json of {ref} is not valid JSON; fix it") from None
        return kind, config
    row = find_registered(session, project, ref)
    if row is None:
        raise field_problem(
            pointer,
            f"no registered model {ref!r} in this project; see GET /api/v1/models, or use `name`, `name@latest` "
            "or `name@<version>`",
            slug="model-not-found",
            title="No such model",
        )
    names = set(row.files or {})
    kind = _kind_of(names)
    try:
        config = json.loads(store.get_bytes(f"{row.key}/config.json")) if kind == "causal-lm" else None
    except (OSError, KeyError, ValueError):
        raise _needs(pointer, f"the stored config.json of {ref} cannot be read; register the model again") from None
    return kind, config


def check_model_params(
    session: Session, settings: Settings, store: ObjectStore, method: MethodSpec, params: dict[str, Any], project: str
) -> None:
    """Resolve and check every model a job's params name (see the module docstring)."""
    from models.llm.folder import ModelFolderError, check_causal_config, check_layout

    for field, needs in model_fields(method.params).items():
        ref = params.get(field)
        if not ref or ref in needs.get("x-model-builtin", ()):
            continue
        pointer = f"/params/{field}"
        kind, config = _resolve(session, settings, store, project, str(ref), pointer)
        wanted, layout = needs["x-model-kind"], needs.get("x-model-layout")
        what = MODEL_LAYOUT_WORDS[layout] if layout else MODEL_KIND_WORDS[wanted]
        if kind != wanted:
            found = MODEL_KIND_WORDS.get(kind, "neither a language model nor a diffusers model")
            raise _needs(pointer, f"{ref} is {found}; {method.id} needs {what}")
        if config is None:
            continue
        try:
            if layout:
                check_layout(config, layout)
            else:
                check_causal_config(config)
        except ModelFolderError as exc:
            raise _needs(pointer, f"{ref}: {exc}; {method.id} needs {what}") from None


def _needs(pointer: str, message: str) -> Problem:
    return field_problem(pointer, message, slug="unsuitable-model", title="The model does not suit the method")
