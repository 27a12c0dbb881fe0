"""Server paths out of what a client reads: error bodies and a failed job's reason.

A file's name says what is wrong (`config.json`, `eora.py`); the folders above it say where this server keeps
its state, its Python and its code, which no client needs to know.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

CODE_ROOT = str(Path(__file__).resolve().parents[1])


def server_roots(home: Path | str | None = None) -> list[str]:
    """Folders of this server whose paths must not be shown (state, temp, the Python install, the code), longest
    first so the most specific one is cut."""
    roots = [tempfile.gettempdir(), sys.prefix, CODE_ROOT] + ([str(home)] if home is not None else [])
    return sorted({r.rstrip("/") for r in roots if r and r != "/"}, key=len, reverse=True)


def scrub_paths(text: str, roots: list[str]) -> str:
    """`/srv/home/cache/models/a/m/1/config.json` → `…/config.json`: a file's name says what is wrong
    without telling a client where the server keeps its state."""
    if not roots or not text:
        return text
    pattern = re.compile("(?:" + "|".join(re.escape(r) for r in roots) + r")(?:/[^\s'\"]*)?(?=$|[\s'\",;)])")
    return pattern.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
