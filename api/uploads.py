"""Reading an uploaded file into memory without trusting its declared size.

Blocking code: routes call it from their work on the blocking pool (`api.offload`), where the upload's
spooled file is read, never on the event loop.
"""

from __future__ import annotations

from typing import BinaryIO

from api.problems import Problem


def read_capped(stream: BinaryIO, limit: int, fix: str) -> bytes:
    """The file's bytes; a 413 naming the limit and `fix` as soon as more than `limit` bytes were read."""
    blob = bytearray()
    while chunk := stream.read(1024 * 1024):
        blob += chunk
        if len(blob) > limit:
            raise Problem(
                413,
                "upload-too-large",
                "Upload too large",
                f"the file is over {limit} bytes; {fix}",
                errors=[{"pointer": "/file", "message": "too large"}],
                extra={"limit_bytes": limit},
            )
    return bytes(blob)
