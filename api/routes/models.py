"""The model registry: jobs register models through their RunContext; people import folders here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Request, Response, UploadFile, status
from sqlalchemy import func, select

from api.auth import PrincipalDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep
from api.model_imports import MODEL_NAME_RULE, import_model
from api.openapi import errors
from api.problems import Problem, pattern_hint
from api.routes.datasets import NAME_WORDS
from api.routes.deployments import MAX_INT
from api.schemas import ModelOut
from api.uploads import read_capped
from workers.tables import ACTIVE, Deployment, Job, RegisteredModel

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


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@router.delete("/{name}/{version}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
def delete_version(
    name: str,
    version: Annotated[int, Path(ge=1, le=MAX_INT, description="the version number (see GET /api/v1/models/{name})")],
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
) -> Response:
    """Delete one version of a registered model (its stored files too). Refused while a deployment serves it or
    a queued or running job names it in its params (`name@version`, or `name` / `name@latest` for the latest)."""
    q = select(RegisteredModel).where(RegisteredModel.project == who.project, RegisteredModel.name == name)
    row = session.scalars(q.where(RegisteredModel.version == version)).first()
    if row is None:
        raise Problem(
            404,
            "model-not-found",
            "No such model",
            f"no version {version} of a model named {name!r}; see /api/v1/models",
        )
    ref = f"{name}@{version}"
    serving = session.scalars(
        select(Deployment.name).where(Deployment.project == who.project, Deployment.model == ref)
    ).first()
    if serving is not None:
        raise Problem(
            409,
            "model-in-use",
            "The model is in use",
            f"deployment {serving} serves {ref}; delete the deployment first",
            extra={"deployment": serving},
        )
    latest = session.scalar(
        select(func.max(RegisteredModel.version)).where(
            RegisteredModel.project == who.project, RegisteredModel.name == name
        )
    )
    names = {ref} | ({name, f"{name}@latest"} if version == latest else set())
    for job in session.scalars(
        select(Job).where(Job.project == who.project, Job.status.in_(("queued", *ACTIVE))).order_by(Job.id)
    ):
        if names & set(_strings(job.params)):
            raise Problem(
                409,
                "model-in-use",
                "The model is in use",
                f"job {job.id} ({job.status}) names {ref} in its params; cancel it or wait for it to finish",
                extra={"job_id": job.id},
            )
    session.delete(row)
    audit(session, request, who, "model.delete", ref, files=len(row.files or {}))
    session.commit()  # the row first: a failure after this leaves orphaned objects, never a row without files
    store.delete_prefix(f"{row.key}/")
    # this machine's copy too (a copy elsewhere is not served for a later version 2: its manifest differs)
    shutil.rmtree(settings.cache_dir / "models" / who.project / name / str(version), ignore_errors=True)
    return Response(status_code=204)


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(409, 415, 503))
async def import_folder(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    name: str = Form(
        ..., pattern=pattern_hint(MODEL_NAME_RULE, NAME_WORDS), description="2-64 lowercase letters, digits, . _ -"
    ),
    file: UploadFile = File(
        ..., description="a .zip or .tar.gz of a Hugging Face or diffusers folder with safetensors weights"
    ),
) -> ModelOut:
    """Import a local model folder (e.g. a real Llama or Stable Diffusion) as a new version of `name`.

    Reading, extracting and checking the archive run on the blocking pool, never on the event loop;
    the project's storage quota is charged the decompressed bytes."""

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
