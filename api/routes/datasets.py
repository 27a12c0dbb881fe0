"""Datasets: built-ins and uploads (validated against their kind before anything is stored)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, File, Form, Request, UploadFile, status

from api.auth import PrincipalDep, audit, check_storage_quota
from api.deps import SessionDep, SettingsDep, StoreDep
from api.problems import Problem, field_problem
from api.uploads import read_capped
from models.datasets import KINDS
from workers.datasets import NAME_RULE, DatasetTooLarge, Upload, all_infos, find_info, store_upload

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


@router.get("")
def datasets(session: SessionDep, who: PrincipalDep, kind: str | None = None) -> dict[str, Any]:
    items = [i.describe() for i in all_infos(session, who.project) if kind is None or i.kind == kind]
    return {
        "items": items,
        "kinds": {k: {"description": v.description, "formats": list(v.formats)} for k, v in KINDS.items()},
    }


@router.get("/{name}")
def dataset(session: SessionDep, who: PrincipalDep, name: str) -> dict[str, Any]:
    return find_info(session, name, who.project).describe()


@router.post("", status_code=status.HTTP_201_CREATED)
async def upload(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    request: Request,
    name: str = Form(..., description="lowercase letters, digits, . _ -"),
    kind: str = Form(..., description="a dataset kind, e.g. image-class"),
    file: UploadFile = File(..., description=".npz (numeric kinds) or .jsonl (text kinds)"),
    description: str = Form(""),
) -> dict[str, Any]:
    if not re.match(NAME_RULE, name):
        raise field_problem(
            "/name", "use 2-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if kind not in KINDS:
        raise field_problem("/kind", f"unknown kind {kind!r}; use one of {sorted(KINDS)}")
    fmt = (file.filename or "").rsplit(".", 1)[-1].lower()
    if fmt not in ("npz", "jsonl"):
        raise Problem(
            415,
            "unsupported-format",
            "Unsupported file format",
            f"file {file.filename!r}: upload a .npz or .jsonl file",
            errors=[{"pointer": "/file", "message": "use .npz or .jsonl"}],
        )

    def work() -> dict[str, Any]:  # parsing is CPU work: on the blocking pool, never on the event loop
        session.commit()  # the key's bookkeeping: no write lock held while the file is parsed
        blob = read_capped(file.file, settings.max_upload_bytes, "split it or raise CRUCIBLE_MAX_UPLOAD_BYTES")
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
        return find_info(session, row.name, who.project).describe()

    return await request.app.state.blocking.run(work)
