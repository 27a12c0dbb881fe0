"""Uploaded files: their size checked without reading them, or read into memory without trusting a declared size.

Blocking code: routes call it from their work on the blocking pool (`api.offload`), where the upload's
spooled file is read, never on the event loop.
"""

from __future__ import annotations

from typing import BinaryIO

from api.problems import Problem


def too_large(limit: int, fix: str) -> Problem:
    return Problem(
        413,
        "upload-too-large",
        "Upload too large",
        f"the file is over {limit} bytes; {fix}",
        errors=[{"pointer": "/file", "message": "too large"}],
        extra={"limit_bytes": limit},
    )


def check_size(stream: BinaryIO, limit: int, fix: str) -> int:
    """The size of a spooled upload (seeking to its end, reading nothing); a 413 naming the limit and `fix` when it
    is over `limit`. The stream is left at its start."""
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    if size > limit:
        raise too_large(limit, fix)
    return size


def read_capped(stream: BinaryIO, limit: int, fix: str) -> bytes:
    """The file's bytes; a 413 naming the limit and `fix` as soon as more than `limit` bytes were read."""
    blob = bytearray()
    while chunk := stream.read(1024 * 1024):
        blob += chunk
        if len(blob) > limit:
            raise too_large(limit, fix)
    return bytes(blob)
