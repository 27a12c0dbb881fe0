"""Datasets: built-ins and uploads (validated against their kind before anything is stored)."""

from __future__ import annotations

import io
import zipfile
from typing import Any, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import PrincipalDep, audit, check_storage_quota
from api.deps import SessionDep, SettingsDep, StoreDep
from api.openapi import errors
from api.problems import Problem, dataset_problem, field_problem, pattern_hint
from api.resumable import assembled, discard, get_upload
from api.uploads import read_capped
from models.datasets import KINDS, DatasetSchemaError, is_builtin
from workers.datasets import NAME_RULE, DatasetTooLarge, Upload, all_infos, find_info, store_upload
from workers.tables import ACTIVE, DatasetRow, Job

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])
NAME_WORDS = "use 2-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
NAME_PATTERN = pattern_hint(NAME_RULE, NAME_WORDS)


def npz_arrays(blob: bytes) -> list[str]:
    """The array names an .npz holds (its members, less `.npy`), read from the zip's directory only."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


@router.get("")
def datasets(
    session: SessionDep,
    who: PrincipalDep,
    kind: Literal[tuple(KINDS)] | None = None,  # type: ignore[valid-type]
) -> dict[str, Any]:
    items = [i.describe() for i in all_infos(session, who.project) if kind is None or i.kind == kind]
    return {
        "items": items,
        "kinds": {k: {"description": v.description, "formats": list(v.formats)} for k, v in KINDS.items()},
    }


@router.get("/{name}")
def dataset(session: SessionDep, who: PrincipalDep, name: str) -> dict[str, Any]:
    return find_info(session, name, who.project).describe()


def in_use_by(session: Session, project: str, **where: Any) -> Job | None:
    """A queued or running job of the project whose columns match `where` (the oldest), or None."""
    q = select(Job).where(Job.project == project, Job.status.in_(("queued", *ACTIVE)))
    for column, value in where.items():
        q = q.where(getattr(Job, column) == value)
    return session.scalars(q.order_by(Job.id).limit(1)).first()


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
def delete_dataset(name: str, session: SessionDep, store: StoreDep, who: PrincipalDep, request: Request) -> Response:
    """Delete an uploaded dataset (its stored file too); refused while a queued or running job uses it.
    Finished jobs keep their record of it; a retry of one then fails at start, naming the dataset."""
    if is_builtin(name):
        raise Problem(
            409, "dataset-builtin", "Built-in datasets cannot be deleted", f"{name} ships with the server's code"
        )
    row = session.scalars(select(DatasetRow).where(DatasetRow.project == who.project, DatasetRow.name == name)).first()
    if row is None:
        raise Problem(404, "dataset-not-found", "No such dataset", f"no dataset named {name!r}; see /api/v1/datasets")
    job = in_use_by(session, who.project, dataset=name)
    if job is not None:
        raise Problem(
            409,
            "dataset-in-use",
            "The dataset is in use",
            f"job {job.id} ({job.status}) uses dataset {name}; cancel it or wait for it to finish",
            extra={"job_id": job.id},
        )
    session.delete(row)
    audit(session, request, who, "dataset.delete", name, kind=row.kind, size=row.size)
    session.commit()  # the row first: a failure after this leaves an orphaned object, never a row without one
    store.delete(row.key)
    return Response(status_code=204)


def file_format(filename: str | None) -> str:
    """`npz` or `jsonl` from the file's name; a 415 naming the field otherwise."""
    fmt = (filename or "").rsplit(".", 1)[-1].lower()
    if fmt not in ("npz", "jsonl"):
        raise Problem(
            415,
            "unsupported-format",
            "Unsupported file format",
            f"file {filename!r}: upload a .npz or .jsonl file",
            errors=[{"pointer": "/file", "message": "use .npz or .jsonl"}],
        )
    return fmt


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(404, 409, 415, 503))
async def upload(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    name: str = Form(..., pattern=NAME_PATTERN, description="2-64 lowercase letters, digits, . _ -"),
    kind: Literal[tuple(KINDS)] = Form(..., description="a dataset kind, e.g. image-class"),  # type: ignore[valid-type]
    file: UploadFile | None = File(None, description=".npz (numeric kinds) or .jsonl (text kinds)"),
    upload: str | None = Form(
        None,
        description="instead of `file`: the id of a finished resumable upload of such a file (POST /api/v1/uploads)",
    ),
    description: str = Form(""),
) -> dict[str, Any]:
    if (file is None) == (upload is None):
        raise field_problem("/file", "send the file as `file`, or name a finished resumable upload as `upload`")
    if file is not None:
        file_format(file.filename)

    def work() -> dict[str, Any]:  # parsing is CPU work: on the blocking pool, never on the event loop
        session.commit()  # the key's bookkeeping: no write lock held while the file is parsed
        fix = "split it or raise CRUCIBLE_MAX_UPLOAD_BYTES"
        if upload is None:
            assert file is not None
            fmt, sent = file_format(file.filename), None
            blob = read_capped(file.file, settings.max_upload_bytes, fix)
        else:
            sent = get_upload(session, store, who.project, upload)
            fmt = file_format(sent.filename)
            with assembled(store, sent, settings.home) as stream:
                blob = read_capped(stream, settings.max_upload_bytes, fix)
        check_storage_quota(session, settings, who.project, len(blob))
        try:
            row = store_upload(
                session, store, Upload(name, kind, fmt, blob, description), who.project, settings.max_dataset_bytes
            )
        except FileExistsError:
            raise field_problem(
                "/name",
                f"a dataset named {name!r} exists; choose another name",
                status=409,
                slug="dataset-exists",
                title="Dataset exists",
            ) from None
        except DatasetSchemaError as exc:
            raise dataset_problem(exc, npz_arrays(blob) if fmt == "npz" else ()) from None
        except DatasetTooLarge as exc:
            raise Problem(
                413,
                "dataset-too-large",
                "The dataset is too large once decoded",
                f"{exc.what} decodes to {exc.size} bytes; the limit is {exc.limit} bytes "
                "(CRUCIBLE_MAX_DATASET_BYTES); upload a smaller dataset",
                errors=[{"pointer": "/file", "message": f"{exc.size} bytes decoded > {exc.limit}"}],
                extra={"limit_bytes": exc.limit},
            ) from None
        audit(session, request, who, "dataset.upload", name, kind=kind, size=len(blob))
        out = find_info(session, row.name, who.project).describe()
        if sent is not None:
            discard(session, store, sent)  # commits the audit row with it
        return out

    return await request.app.state.blocking.run(work)
