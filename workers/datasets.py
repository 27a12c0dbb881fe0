"""Datasets on the service side: built-ins from code, uploads from the object store (validated twice:
when stored and when loaded, since the store is outside our process)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.datasets import (
    KINDS,
    Dataset,
    DatasetInfo,
    DatasetSchemaError,
    UnknownDatasetError,
    builtin_infos,
    is_builtin,
    load_builtin,
    parse_upload,
)
from workers.storage import ObjectStore
from workers.tables import DEFAULT_PROJECT, DatasetRow

NAME_RULE = r"^[a-z0-9][a-z0-9._-]{1,63}$"


def all_infos(session: Session, project: str = DEFAULT_PROJECT) -> list[DatasetInfo]:
    """The built-ins (everyone's) and this project's uploads (no one else's)."""
    rows = session.scalars(select(DatasetRow).where(DatasetRow.project == project).order_by(DatasetRow.name))
    uploads = [
        DatasetInfo(r.name, r.kind, r.description, "upload", {**r.meta, "size_bytes": r.size, "format": r.format})
        for r in rows
    ]
    return builtin_infos() + uploads


def find_info(session: Session, name: str, project: str = DEFAULT_PROJECT) -> DatasetInfo:
    infos = all_infos(session, project)
    for info in infos:
        if info.name == name:
            return info
    raise UnknownDatasetError(name, [i.name for i in infos])


def load_dataset(session: Session, store: ObjectStore, name: str, project: str = DEFAULT_PROJECT) -> Dataset:
    if is_builtin(name):
        return load_builtin(name)
    row = session.scalars(select(DatasetRow).where(DatasetRow.project == project, DatasetRow.name == name)).first()
    if row is None:
        raise UnknownDatasetError(name, [i.name for i in all_infos(session, project)])
    blob = store.get_bytes(row.key)
    if hashlib.sha256(blob).hexdigest() != row.sha256:
        raise DatasetSchemaError("file", f"stored object of dataset {name} fails its sha256 check", "upload it again")
    return parse_upload(name, row.kind, row.format, blob)


@dataclass(frozen=True)
class Upload:
    name: str
    kind: str
    format: str
    blob: bytes
    description: str = ""


def store_upload(session: Session, store: ObjectStore, upload: Upload, project: str = DEFAULT_PROJECT) -> DatasetRow:
    """Validate, then store the object, then publish the row; on any failure nothing stays behind."""
    if (
        is_builtin(upload.name)
        or session.scalars(
            select(DatasetRow).where(DatasetRow.project == project, DatasetRow.name == upload.name)
        ).first()
    ):
        raise FileExistsError(upload.name)
    ds = parse_upload(upload.name, upload.kind, upload.format, upload.blob)
    meta: dict[str, Any] = {k: v for k, v in ds.meta.items() if isinstance(v, (int, float, str, list))}
    meta["splits"] = {s: len(sp) for s, sp in ds}
    key = f"datasets/{project}/{upload.name}/data.{upload.format}"
    stored = store.put_bytes(key, upload.blob)
    try:
        row = DatasetRow(
            project=project,
            name=upload.name,
            kind=upload.kind,
            format=upload.format,
            key=key,
            size=stored.size,
            sha256=stored.sha256,
            meta=meta,
            description=upload.description or KINDS[upload.kind].description,
        )
        session.add(row)
        session.flush()
    except Exception:
        store.delete(key)
        raise
    return row
