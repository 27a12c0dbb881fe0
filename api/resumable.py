"""Resumable uploads: a large file sent in parts, each appended at the offset the server has reached.

The protocol is tus's core (tus.io, "resumable upload protocol 1.0"), in JSON:

- `POST /api/v1/uploads` `{filename, size, sha256?}` declares the file; the answer's `id` names it and its
  `offset` is 0. A size over `CRUCIBLE_MAX_UPLOAD_BYTES`, or over what the project's storage quota has left,
  is refused here, before a byte is sent.
- `PATCH /api/v1/uploads/{id}` with `Upload-Offset: <n>` and up to `CRUCIBLE_UPLOAD_PART_BYTES` of raw body
  appends one part at n, which must be the offset the server has (409 with the right one otherwise), and
  answers the new offset.
- `GET /api/v1/uploads/{id}` says the offset to resume from after a broken connection.
- The finished file is used by naming it: `POST /api/v1/models` with `upload=<id>` instead of `file`. The
  upload and its parts are deleted once the model is registered; an unfinished one is deleted
  `CRUCIBLE_UPLOAD_TTL_S` after it was created, or by `DELETE /api/v1/uploads/{id}`.

Parts are objects in the store, not files of one API process, so any replica takes the next part. The row's
`offset` advances by a compare-and-set on the old value: of two clients racing at one offset one wins and the
other gets a 409 (its part object is removed), so the file is never spliced from both.

Blocking code (the store and the database); routes run it on the blocking pool.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from api.auth import check_storage_quota
from api.problems import Problem, field_problem
from api.uploads import too_large
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import Upload, new_id, utcnow

CHUNK = 1024 * 1024


def upload_not_found(upload_id: str) -> Problem:
    return Problem(
        404,
        "upload-not-found",
        "No such upload",
        f"no unfinished upload {upload_id} in this project (finished uploads are deleted once used, unfinished "
        "ones when they expire); start again with POST /api/v1/uploads",
        errors=[{"pointer": "/upload", "message": "unknown or expired upload"}],
    )


def sweep_expired(session: Session, store: ObjectStore, project: str) -> int:
    """Delete the project's uploads past their expiry, parts first; how many."""
    rows = session.scalars(select(Upload).where(Upload.project == project, Upload.expires_at < utcnow())).all()
    for row in rows:
        store.delete_prefix(parts_prefix(row))
        session.delete(row)
    if rows:
        session.commit()
    return len(rows)


def parts_prefix(row: Upload) -> str:
    return f"uploads/{row.project}/{row.id}/"


def create_upload(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    project: str,
    filename: str,
    size: int,
    sha256: str | None,
    created_by: str | None,
) -> Upload:
    """Declare an upload of `size` bytes; refused now if the file could never be used (too large, over quota) or
    the project already holds its cap of unfinished uploads."""
    sweep_expired(session, store, project)
    if size > settings.max_upload_bytes:
        raise too_large(
            settings.max_upload_bytes,
            "ask the operator to raise CRUCIBLE_MAX_UPLOAD_BYTES, or put the folder under "
            "an import root (CRUCIBLE_IMPORT_ROOTS) and name its path as a job's or deployment's model",
        )
    check_storage_quota(session, settings, project, size, pointer="/size")
    open_count = session.scalar(select(func.count()).select_from(Upload).where(Upload.project == project)) or 0
    if open_count >= settings.max_open_uploads_per_project:
        raise Problem(
            409,
            "too-many-uploads",
            "Too many unfinished uploads",
            f"project {project} holds {open_count} unfinished uploads (the limit is "
            f"{settings.max_open_uploads_per_project}); finish or DELETE one, or wait for them to expire",
        )
    now = utcnow()
    row = Upload(
        id=new_id(),
        project=project,
        filename=filename,
        size=size,
        sha256=sha256,
        offset=0,
        parts=[],
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.upload_ttl_s),
    )
    session.add(row)
    return row


def get_upload(session: Session, store: ObjectStore, project: str, upload_id: str) -> Upload:
    """The project's unfinished upload `upload_id`; 404 when there is none (or it expired: then it is swept)."""
    row = session.get(Upload, upload_id)
    if row is None or row.project != project:
        raise upload_not_found(upload_id)
    if row.expires_at < utcnow():
        sweep_expired(session, store, project)
        raise upload_not_found(upload_id)
    return row


def append_part(session: Session, store: ObjectStore, row: Upload, offset: int, part: BinaryIO, length: int) -> int:
    """Store `length` bytes of `part` at `offset` and advance the upload's offset; the new offset. 409 naming the
    server's offset when `offset` is not it (a resent or racing part); the part is then not kept."""
    if offset != row.offset:
        raise offset_mismatch(row, offset)
    if length == 0:
        raise field_problem("/body", "the part is empty; send the bytes from Upload-Offset on")
    if offset + length > row.size:
        raise Problem(
            413,
            "upload-beyond-size",
            "The part goes past the declared size",
            f"the upload was declared as {row.size} bytes and this part would end at byte {offset + length}; send "
            f"at most {row.size - offset} bytes, or start a new upload with the right size",
            errors=[{"pointer": "/body", "message": "past the declared size"}],
        )
    key = f"{parts_prefix(row)}{offset:016d}-{new_id()}"
    store.put_stream(key, part)
    session.commit()  # end the read transaction: the compare-and-set below sees the latest row
    parts = [*row.parts, [offset, length, key]]
    done = session.execute(
        update(Upload)
        .where(Upload.id == row.id, Upload.offset == offset)
        .values(offset=offset + length, parts=parts)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # another client appended at this offset first
        session.rollback()
        store.delete(key)
        session.refresh(row)
        raise offset_mismatch(row, offset)
    session.commit()
    session.refresh(row)
    return row.offset


def offset_mismatch(row: Upload, offset: int) -> Problem:
    return Problem(
        409,
        "upload-offset-mismatch",
        "The part is not at the upload's offset",
        f"this part starts at byte {offset} but the server holds {row.offset} of {row.size} bytes; send the part "
        f"that starts at {row.offset} (GET /api/v1/uploads/{row.id} says where to resume)",
        headers={"Upload-Offset": str(row.offset)},
        extra={"offset": row.offset, "size": row.size},
    )


@contextmanager
def assembled(store: ObjectStore, row: Upload, spool_dir: Path) -> Iterator[BinaryIO]:
    """The finished upload as one temporary file on disk (parts streamed into it in order, never whole in memory),
    checked against the declared size and sha256; 409 while parts are missing, 422 when the bytes differ."""
    if row.offset != row.size:
        raise Problem(
            409,
            "upload-incomplete",
            "The upload is not finished",
            f"upload {row.id} holds {row.offset} of its {row.size} bytes; send the rest with PATCH "
            f"/api/v1/uploads/{row.id} from Upload-Offset {row.offset}",
            errors=[{"pointer": "/upload", "message": "unfinished"}],
            extra={"offset": row.offset, "size": row.size},
        )
    digest = hashlib.sha256()
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        for _, _, key in sorted(row.parts):
            for chunk in store.iter_chunks(key, CHUNK):
                digest.update(chunk)
                spool.write(chunk)
        if spool.tell() != row.size:  # a part object lost or changed under us
            raise field_problem("/upload", f"the stored parts hold {spool.tell()} bytes, not {row.size}; upload again")
        if row.sha256 and digest.hexdigest() != row.sha256.lower():
            raise field_problem(
                "/upload",
                f"the bytes received hash to sha256 {digest.hexdigest()}, not the {row.sha256} declared; a part was "
                "corrupted on the way: DELETE the upload and send it again",
            )
        spool.seek(0)
        yield spool


def discard(session: Session, store: ObjectStore, row: Upload) -> None:
    """Delete the upload: the row first (so a failure leaves orphaned objects, never a row without parts)."""
    prefix = parts_prefix(row)
    session.execute(delete(Upload).where(Upload.id == row.id))
    session.commit()
    store.delete_prefix(prefix)
