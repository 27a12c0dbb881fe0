"""Reading an uploaded file into memory without trusting its declared size."""

from __future__ import annotations

from fastapi import UploadFile

from api.problems import Problem


async def read_capped(file: UploadFile, limit: int, fix: str) -> bytes:
    """The file's bytes; a 413 naming the limit and `fix` as soon as more than `limit` bytes arrived."""
    blob = bytearray()
    while chunk := await file.read(1024 * 1024):
        blob += chunk
        if len(blob) > limit:
            raise Problem(
                413,
                "upload-too-large",
                "Upload too large",
                f"the file is over {limit} bytes; {fix}",
                errors=[{"pointer": "/file", "message": "too large"}],
            )
    return bytes(blob)
