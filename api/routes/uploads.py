"""Resumable uploads (`api.resumable`): declare a file, send it in parts at the offset reached, resume after a
broken connection, then name it where a file is taken (`POST /api/v1/models` with `upload=<id>`)."""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status

from api.auth import PrincipalDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep
from api.openapi import errors
from api.problems import field_problem
from api.resumable import append_part, create_upload, discard, get_upload
from api.schemas import MAX_BYTES, UploadIn, UploadOut
from api.uploads import too_large

router = APIRouter(prefix="/api/v1/uploads", tags=["uploads"])


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(409, 413))
async def start_upload(
    body: UploadIn, session: SessionDep, store: StoreDep, settings: SettingsDep, who: PrincipalDep, request: Request
) -> UploadOut:
    """Declare a file to send in parts; refused now when it could never be used (over the upload cap or the
    project's storage quota). Send it with `PATCH /api/v1/uploads/{id}` from offset 0."""

    def work() -> UploadOut:
        row = create_upload(session, store, settings, who.project, body.filename, body.size, body.sha256, who.key_id)
        audit(session, request, who, "upload.create", row.id, filename=body.filename, size=body.size)
        session.commit()
        return UploadOut.of(row, settings.upload_part_bytes)

    return await request.app.state.blocking.run(work)


@router.get("/{upload_id}", responses=errors(404))
async def upload_status(
    upload_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep, who: PrincipalDep, request: Request
) -> Response:
    """Where the upload stands: `offset` is where the next part starts (also in the `Upload-Offset` header, as
    tus clients read it)."""

    def work() -> UploadOut:
        return UploadOut.of(get_upload(session, store, who.project, upload_id), settings.upload_part_bytes)

    out = await request.app.state.blocking.run(work)
    return Response(out.model_dump_json(), media_type="application/json", headers=offset_headers(out))


@router.patch(
    "/{upload_id}",
    responses=errors(404, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def send_part(
    upload_id: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    upload_offset: Annotated[
        int | None,
        Header(ge=0, le=MAX_BYTES, description="the byte of the file this part starts at: the upload's offset"),
    ] = None,
) -> Response:
    """Append the body (raw bytes of any content type, tus's `application/offset+octet-stream` too, up to
    `CRUCIBLE_UPLOAD_PART_BYTES`) at `Upload-Offset`, which must be the
    upload's offset; answers the new one. A part resent after a lost answer gets a 409 carrying the offset the
    server already has, so the client carries on from there."""
    limit = settings.upload_part_bytes
    with tempfile.SpooledTemporaryFile(max_size=4 * 1024 * 1024, dir=settings.home) as part:
        length = 0
        async for chunk in request.stream():  # counted as it arrives: a part over the cap is refused mid-way
            length += len(chunk)
            if length > limit:
                raise too_large(limit, "send smaller parts (the upload's part_bytes says the largest)")
            part.write(chunk)
        part.seek(0)

        def work() -> UploadOut:
            row = get_upload(session, store, who.project, upload_id)
            if upload_offset is None:
                raise field_problem(
                    "/Upload-Offset",
                    f"send the header Upload-Offset: the byte this part starts at ({row.offset} for the next part)",
                )
            append_part(session, store, row, upload_offset, part, length)
            return UploadOut.of(row, limit)

        out = await request.app.state.blocking.run(work)
    return Response(out.model_dump_json(), media_type="application/json", headers=offset_headers(out))


@router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404))
async def abort_upload(
    upload_id: str, session: SessionDep, store: StoreDep, who: PrincipalDep, request: Request
) -> Response:
    """Give up an unfinished upload: its parts are deleted."""

    def work() -> None:
        row = get_upload(session, store, who.project, upload_id)
        audit(session, request, who, "upload.delete", row.id, received=row.offset, size=row.size)
        discard(session, store, row)

    await request.app.state.blocking.run(work)
    return Response(status_code=204)


def offset_headers(out: UploadOut) -> dict[str, str]:
    return {"Upload-Offset": str(out.offset), "Upload-Length": str(out.size), "Cache-Control": "no-store"}
