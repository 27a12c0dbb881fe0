"""Datasets on the service side: built-ins from code, uploads from the object store (validated twice:
when stored and when loaded, since the store is outside our process).

An upload is sized before it is parsed: a `.npz` is a zip of `.npy` arrays whose headers state each
array's shape and dtype, so the bytes it decodes to are known from a few hundred header bytes, and a
265 KB `savez_compressed` of zeros that would decode to 512 MB is refused (`DatasetTooLarge`) without
decoding it. A `.jsonl` is counted as its text plus the Python objects each line becomes.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
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


JSONL_LINE_OVERHEAD = 128  # bytes of Python objects (a dict, a str, a list slot) each line becomes
NPZ_MAX_MEMBERS = 64  # arrays an .npz may hold (the layouts use at most six)


class DatasetTooLarge(ValueError):
    """An upload that decodes to more than the limit: `what` (an array or the file), its `size`, the `limit`."""

    def __init__(self, what: str, size: int, limit: int):
        super().__init__(f"{what} decodes to {size} bytes, over {limit}")
        self.what, self.size, self.limit = what, size, limit


def _npy_header(stream: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), dtype


def npz_decoded_bytes(blob: bytes) -> dict[str, int]:
    """Each array's decoded size, read from the `.npy` headers alone (nothing is decompressed past them)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DatasetSchemaError(
            "file", f"not a readable .npz archive ({exc})", "save with numpy.savez of numeric arrays"
        ) from exc
    sizes: dict[str, int] = {}
    with zf:
        infos = zf.infolist()
        if len(infos) > NPZ_MAX_MEMBERS:
            raise DatasetSchemaError(
                "file", f"{len(infos)} arrays; at most {NPZ_MAX_MEMBERS}", "save only the dataset's arrays"
            )
        for info in infos:
            name = info.filename.removesuffix(".npy")
            try:
                with zf.open(info) as stream:
                    shape, dtype = _npy_header(stream)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
                raise DatasetSchemaError(
                    "file", f"{info.filename} is not a .npy array ({exc})", "save with numpy.savez of numeric arrays"
                ) from exc
            if dtype.hasobject:
                raise DatasetSchemaError(
                    name, "is an object array (a pickle)", "store numbers: object arrays are never loaded here"
                )
            sizes[name] = math.prod(shape) * dtype.itemsize
    return sizes


def check_decoded_size(fmt: str, blob: bytes, limit: int) -> int:
    """The bytes `blob` decodes to in memory; DatasetTooLarge beyond `limit`, before anything is decoded."""
    if fmt == "npz":
        sizes = npz_decoded_bytes(blob)
        for name, size in sizes.items():
            if size > limit:
                raise DatasetTooLarge(f"array {name}", size, limit)
        total = sum(sizes.values())
        if total > limit:
            raise DatasetTooLarge("the arrays together", total, limit)
        return total
    total = len(blob) + JSONL_LINE_OVERHEAD * (blob.count(b"\n") + 1)
    if total > limit:
        raise DatasetTooLarge(f"the .jsonl ({len(blob)} bytes of text)", total, limit)
    return total


@dataclass(frozen=True)
class Upload:
    name: str
    kind: str
    format: str
    blob: bytes
    description: str = ""


def store_upload(
    session: Session,
    store: ObjectStore,
    upload: Upload,
    project: str = DEFAULT_PROJECT,
    max_decoded_bytes: int | None = None,
) -> DatasetRow:
    """Size (from headers), validate, then store the object, then publish the row; on any failure nothing
    stays behind."""
    if (
        is_builtin(upload.name)
        or session.scalars(
            select(DatasetRow).where(DatasetRow.project == project, DatasetRow.name == upload.name)
        ).first()
    ):
        raise FileExistsError(upload.name)
    if max_decoded_bytes is not None:
        check_decoded_size(upload.format, upload.blob, max_decoded_bytes)
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
