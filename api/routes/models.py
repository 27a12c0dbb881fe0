"""The model registry: jobs register models through their RunContext; people import folders here."""

from __future__ import annotations

import re

from fastapi import APIRouter, File, Form, Request, UploadFile, status
from sqlalchemy import select

from api.auth import PrincipalDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep
from api.model_imports import MODEL_NAME_RULE, import_model
from api.problems import Problem, field_problem
from api.schemas import ModelOut
from api.uploads import read_capped
from workers.tables import RegisteredModel

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("")
def models(session: SessionDep, who: PrincipalDep) -> dict[str, list[ModelOut]]:
    rows = session.scalars(
        select(RegisteredModel)
        .where(RegisteredModel.project == who.project)
        .order_by(RegisteredModel.name, RegisteredModel.version.desc())
    )
    return {"items": [ModelOut.of(r) for r in rows]}


@router.get("/{name}")
def model_versions(session: SessionDep, who: PrincipalDep, name: str) -> dict[str, list[ModelOut]]:
    rows = list(
        session.scalars(
            select(RegisteredModel)
            .where(RegisteredModel.project == who.project, RegisteredModel.name == name)
            .order_by(RegisteredModel.version.desc())
        )
    )
    if not rows:
        raise Problem(
            404, "model-not-found", "No such model", f"no registered model named {name!r}; see /api/v1/models"
        )
    return {"items": [ModelOut.of(r) for r in rows]}


@router.post("", status_code=status.HTTP_201_CREATED)
async def import_folder(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    name: str = Form(..., description="lowercase letters, digits, . _ -"),
    file: UploadFile = File(
        ..., description="a .zip or .tar.gz of a Hugging Face or diffusers folder with safetensors weights"
    ),
) -> ModelOut:
    """Import a local model folder (e.g. a real Llama or Stable Diffusion) as a new version of `name`.

    Reading, extracting and checking the archive run on the blocking pool, never on the event loop;
    the project's storage quota is charged the decompressed bytes."""
    if not re.match(MODEL_NAME_RULE, name):
        raise field_problem(
            "/name", "use 2-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )

    def work() -> ModelOut:
        session.commit()  # the key's bookkeeping: no write lock held while the archive is read
        blob = read_capped(
            file.file,
            settings.max_upload_bytes,
            "raise CRUCIBLE_MAX_UPLOAD_BYTES or put the folder under an import root",
        )
        row = import_model(session, store, settings, who.project, name, blob)
        audit(session, request, who, "model.import", f"{name}@{row.version}", files=len(row.files))
        return ModelOut.of(row)

    return await request.app.state.blocking.run(work)
