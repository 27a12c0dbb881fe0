"""Safe extraction of uploaded model archives (.zip, .tar, .tar.gz).

An archive is hostile until proven otherwise. Every member is checked before a byte is written:
names must be relative paths of safe segments (no `..`, no absolute paths, no control characters —
zip-slip), members must be regular files (no symlinks, hard links or devices), the member count and
the *actually decompressed* size are capped (a zip bomb lies in its headers, so bytes are counted as
they stream), and only non-executable formats are accepted: pickled weights (`.bin`, `.pt`, `.pkl`,
…) are refused by name and never opened, so nothing in an upload can run code when loaded.
"""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from models.context import ArtifactNameError, check_artifact_name

# What a Hugging Face / diffusers folder is made of once pickles are excluded.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".jinja", ".model", ".tiktoken", ".py.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".h5", ".msgpack")


class UnsafeArchiveError(ValueError):
    """The archive breaks a rule; `field` says which part of the request to fix."""

    def __init__(self, message: str, *, status: int = 422, field: str = "/file"):
        super().__init__(message)
        self.status, self.field = status, field


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_bytes: int


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    is_file: bool
    is_dir: bool
    open: object  # () -> BinaryIO


def _check_member_name(raw: str) -> str:
    stripped = raw.rstrip("/")
    if any(ord(c) < 32 or ord(c) == 127 for c in stripped):
        raise UnsafeArchiveError(f"archive member {raw!r} has control characters in its name")
    try:
        return check_artifact_name(stripped)
    except ArtifactNameError:
        raise UnsafeArchiveError(
            f"archive member {raw!r} would land outside the model folder "
            "(absolute path, `..` or unusual characters); repack it with relative names"
        ) from None


def _zip_members(blob: bytes) -> Iterator[_Member]:
    zf = zipfile.ZipFile(io.BytesIO(blob))
    for info in zf.infolist():
        mode = (info.external_attr >> 16) & 0o170000
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchiveError(
                f"archive member {info.filename!r} is a link or special file; only regular files are accepted"
            )
        yield _Member(info.filename, info.file_size, not info.is_dir(), info.is_dir(), lambda info=info: zf.open(info))


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    for info in tf.getmembers():
        if not (info.isreg() or info.isdir()):
            raise UnsafeArchiveError(
                f"archive member {info.name!r} is a link or special file; only regular files are accepted"
            )
        yield _Member(info.name, info.size, info.isreg(), info.isdir(), lambda info=info: tf.extractfile(info))


def members(blob: bytes) -> Iterator[_Member]:
    if zipfile.is_zipfile(io.BytesIO(blob)):
        return _zip_members(blob)
    try:
        tf = tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    except tarfile.TarError:
        raise UnsafeArchiveError(
            "the file is neither a zip nor a tar archive; upload a .zip or .tar.gz of the model folder", status=415
        ) from None
    return _tar_members(tf)


def _copy_capped(src: BinaryIO, dest: Path, budget: int) -> int:
    """Copy until EOF; fail as soon as more than `budget` bytes came out (headers may lie)."""
    written = 0
    with dest.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise UnsafeArchiveError(
                    "the archive decompresses to more than the allowed size (a zip bomb?); upload a smaller model",
                    status=413,
                )
            out.write(chunk)
    return written


def safe_extract(blob: bytes, dest: Path, limits: ArchiveLimits) -> list[str]:
    """Extract into `dest` (created, must not exist) and return the relative file names.

    On any violation nothing is left behind.
    """
    try:
        return _extract(blob, dest, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeArchiveError(f"the archive is corrupt ({type(exc).__name__}: {exc}); pack it again") from None


def _extract(blob: bytes, dest: Path, limits: ArchiveLimits) -> list[str]:
    planned: list[_Member] = []
    seen: set[str] = set()
    declared = 0
    for m in members(blob):
        if m.is_dir:
            _check_member_name(m.name)
            continue
        name = _check_member_name(m.name)
        suffix = "".join(PurePosixPath(name).suffixes[-1:]).lower()
        if suffix in PICKLE_SUFFIXES:
            raise UnsafeArchiveError(
                f"{name}: {suffix} files are pickles and are never loaded here; convert the "
                "weights to safetensors (e.g. `save_pretrained(..., safe_serialization=True)`)",
                status=415,
            )
        if not name.lower().endswith(ALLOWED_SUFFIXES):
            raise UnsafeArchiveError(
                f"{name}: unexpected file type; a model folder holds only {', '.join(ALLOWED_SUFFIXES)} files",
                status=415,
            )
        if name in seen:
            raise UnsafeArchiveError(f"{name} appears twice in the archive")
        seen.add(name)
        planned.append(m)
        declared += max(0, m.size)
        if len(planned) > limits.max_files:
            raise UnsafeArchiveError(f"the archive holds more than {limits.max_files} files", status=413)
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(f"the archive's files add up to more than {limits.max_bytes} bytes", status=413)
    if not planned:
        raise UnsafeArchiveError("the archive holds no files")
    dest.mkdir(parents=True)
    try:
        budget = limits.max_bytes
        names = []
        for m in planned:
            name = _check_member_name(m.name)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with m.open() as src:  # type: ignore[operator]
                budget -= _copy_capped(src, target, budget)
            names.append(name)
        return names
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
