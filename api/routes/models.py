"""The model registry: jobs register models through their RunContext; people import folders here."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path as LocalPath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, Request, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.convertors import StringConvertor, register_url_convertor

from api.auth import PrincipalDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep
from api.model_imports import MODEL_NAME_RULE, import_model
from api.model_refs import find_registered, model_not_found
from api.openapi import errors
from api.problems import Problem, field_problem, pattern_hint
from api.resumable import assembled, discard, get_upload
from api.routes.datasets import NAME_WORDS
from api.routes.deployments import MAX_INT
from api.schemas import ModelOut
from api.uploads import check_size
from models.llm.export.base import ExportFormat, Quantization
from workers.archives import tar_gz_stream
from workers.context import resolve_model
from workers.tables import ACTIVE, Deployment, Job, RegisteredModel, latest_version

router = APIRouter(prefix="/api/v1/models", tags=["models"])


class _NotDownload(StringConvertor):
    """A path segment other than `download` or `export`: `DELETE /models/x/download` is then no version's DELETE
    (a 422 about the version) but the download resource's, which answers 405 with its Allow header."""

    regex = "(?!(?:download|export)(?:/|$))[^/]+"


register_url_convertor("notdownload", _NotDownload())


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


@router.get(
    "/{ref}/download",
    response_class=StreamingResponse,
    responses={
        200: {"description": "a .tar.gz of the model folder, streamed", "content": {"application/gzip": {}}},
        **errors(404),
    },
)
def download_version(
    ref: Annotated[str, Path(description="`name@version`, or `name` / `name@latest` for the latest version")],
    session: SessionDep,
    store: StoreDep,
    who: PrincipalDep,
) -> StreamingResponse:
    """The model folder as a .tar.gz (every file under `<name>-<version>/`, as `save_pretrained` wrote it, so
    `tar -xzf` and `from_pretrained` take it as is), streamed from the object store in constant memory."""
    row = find_registered(session, who.project, ref)
    if row is None:
        raise model_not_found(ref, "/ref")
    top = f"{row.name}-{row.version}"
    files = sorted((row.files or {}).items())
    entries = ((f"{top}/{rel}", int(info["size"]), store.iter_chunks(f"{row.key}/{rel}")) for rel, info in files)
    return StreamingResponse(
        tar_gz_stream(entries, mtime=row.created_at.timestamp() if row.created_at else 0),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{top}.tar.gz"', "X-Content-Type-Options": "nosniff"},
    )


EXPORT_TYPES = {"compressed-tensors": "application/gzip", "gguf": "application/octet-stream"}


@router.get(
    "/{ref}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "compressed-tensors: a .tar.gz of the model folder (config.json with its "
            "`quantization_config`, safetensors, tokenizer); gguf: the .gguf file. `X-Export-Notes` says what the "
            "export left out or changed, when anything",
            "content": {media: {} for media in EXPORT_TYPES.values()},
        },
        **errors(404, 503),
    },
)
async def export_version(
    ref: Annotated[str, Path(description="`name@version`, or `name` / `name@latest` for the latest version")],
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    fmt: Annotated[
        ExportFormat,
        Query(
            alias="format",
            description="compressed-tensors (vLLM, llm-compressor: any causal LM) or gguf (llama.cpp, Ollama: "
            "Llama, Mistral and Qwen2 folders)",
        ),
    ] = "compressed-tensors",
    quantization: Annotated[
        Quantization,
        Query(description="dense (as stored), int8 (per-channel / Q8_0) or int4 (groups of 128 / Q4_0) weights"),
    ] = "dense",
) -> StreamingResponse:
    """A registered language model in a format other engines deploy: a compressed-tensors folder (its
    `quantization_config`, and the sparsity its weights show) as a .tar.gz, or a GGUF file. Built on the
    blocking pool into a scratch folder, streamed, then deleted. A format the model cannot have is a 422 naming
    `/format` (or `/quantization`) and what would work."""
    from models.llm.export import ExportError, export_model
    from models.llm.folder import ModelFolderError

    def work() -> tuple[str, LocalPath, list[str], LocalPath]:
        row = find_registered(session, who.project, ref)
        if row is None:
            raise model_not_found(ref, "/ref")
        if "config.json" not in (row.files or {}):
            raise field_problem("/ref", f"{row.name}@{row.version} is not a language model; exports take causal LMs")
        session.commit()  # no read transaction held while the export runs
        folder = resolve_model(f"{row.name}@{row.version}", settings, store, who.project)
        (settings.cache_dir / "exports").mkdir(parents=True, exist_ok=True)
        scratch = LocalPath(tempfile.mkdtemp(dir=settings.cache_dir / "exports"))
        try:
            out = export_model(
                folder,
                scratch,
                fmt,
                quantization,
                f"{row.name}-{row.version}",
                row.config if row.source_job_id else None,
            )
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(exc, ExportError):
                raise field_problem(f"/{exc.field}", f"{exc.message}; {exc.fix}", slug="unsupported-export") from None
            if isinstance(exc, ModelFolderError):
                raise field_problem("/ref", str(exc), slug="unsupported-export") from None
            raise
        return out.path.name, out.path, out.notes, scratch

    name, path, notes, scratch = await request.app.state.blocking.run(work)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        entries = ((f"{name}/{p.relative_to(path).as_posix()}", p.stat().st_size, _chunks(p)) for p in files)
        body, filename = tar_gz_stream(entries), f"{name}.tar.gz"
    else:
        body, filename = _chunks(path), name
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "X-Content-Type-Options": "nosniff"}
    if notes:
        headers["X-Export-Notes"] = "; ".join(notes).encode("ascii", "replace").decode()
    return StreamingResponse(
        body,
        media_type=EXPORT_TYPES[fmt],
        headers=headers,
        background=BackgroundTask(shutil.rmtree, scratch, ignore_errors=True),
    )


def _chunks(path: LocalPath, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@router.delete("/{name}/{version:notdownload}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
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
    latest = latest_version(session, who.project, name)
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


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(404, 409, 413, 415, 503))
async def import_folder(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    name: str = Form(
        ..., pattern=pattern_hint(MODEL_NAME_RULE, NAME_WORDS), description="2-64 lowercase letters, digits, . _ -"
    ),
    file: UploadFile | None = File(
        None, description="a .zip or .tar.gz of a Hugging Face or diffusers folder with safetensors weights"
    ),
    upload: str | None = Form(
        None,
        description="instead of `file`: the id of a finished resumable upload of such an archive "
        "(POST /api/v1/uploads), for files too large to send in one request",
    ),
) -> ModelOut:
    """Import a local model folder (e.g. a real Llama or Stable Diffusion) as a new version of `name`.

    The archive streams to a spooled file on disk as it arrives (up to CRUCIBLE_MAX_UPLOAD_BYTES) and is
    extracted from there, file by file into the object store: it is never held in memory whole. A Hugging Face
    folder is checked for what serving it needs (a causal LM config, weights that match it, a tokenizer);
    pickled weights beside the safetensors are left out unread (`config.skipped` lists them). Reading,
    extracting and checking run on the blocking pool, never on the event loop; the project's storage quota is
    charged the decompressed bytes."""

    if (file is None) == (upload is None):
        raise field_problem(
            "/file",
            "send the archive as `file`, or name a finished resumable upload as `upload` (one of the two)",
        )

    def work() -> ModelOut:
        session.commit()  # the key's bookkeeping: no write lock held while the archive is read
        if upload is not None:
            return import_upload(upload)
        assert file is not None
        check_size(
            file.file,
            settings.max_upload_bytes,
            "send it as a resumable upload (POST /api/v1/uploads), ask the operator to raise "
            "CRUCIBLE_MAX_UPLOAD_BYTES, or put the folder under an import root (CRUCIBLE_IMPORT_ROOTS) and name "
            "its path as a job's model",
        )
        row = import_model(session, store, settings, who.project, name, file.file)
        audit(session, request, who, "model.import", f"{name}@{row.version}", files=len(row.files))
        return ModelOut.of(row)

    def import_upload(upload_id: str) -> ModelOut:
        sent = get_upload(session, store, who.project, upload_id)
        with assembled(store, sent, settings.home) as archive:
            row = import_model(session, store, settings, who.project, name, archive)
        audit(session, request, who, "model.import", f"{name}@{row.version}", files=len(row.files), upload=upload_id)
        out = ModelOut.of(row)
        discard(session, store, sent)  # commits the import's audit row with it
        return out

    return await request.app.state.blocking.run(work)
