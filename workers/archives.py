"""Safe extraction of uploaded model archives (.zip, .tar, .tar.gz).

An archive is hostile until proven otherwise. Every member is checked before a byte is written:
names must be relative paths of safe segments (no `..`, no absolute paths, no control characters —
zip-slip), members must be regular files (no symlinks, hard links or devices), the member count and
the *actually decompressed* size are capped (a zip bomb lies in its headers, so bytes are counted as
they stream), and only non-executable formats are accepted: pickled weights (`.bin`, `.pt`, `.pkl`,
…) are refused by name and never opened, so nothing in an upload can run code when loaded.

Every entry (folders and links included) counts against `max_files` as the archive is read, one
header at a time: a small `.tar.gz` of 200,000 folder entries stops at the limit instead of being
listed whole first. A project's remaining storage quota is a byte budget like the size cap, checked
on the declared sizes before anything is written and on the bytes that actually stream out.
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


class ArchiveOverQuota(UnsafeArchiveError):
    """The archive's files would pass the project's remaining storage quota (`quota_bytes`)."""

    def __init__(self, quota_bytes: int):
        super().__init__(f"the archive's files add up to more than the {quota_bytes} bytes left", status=413)
        self.quota_bytes = quota_bytes


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_bytes: int
    quota_bytes: int | None = None  # what the project may still store; None: unlimited

    @property
    def budget(self) -> int:
        return self.max_bytes if self.quota_bytes is None else min(self.max_bytes, max(0, self.quota_bytes))

    def over(self) -> UnsafeArchiveError:
        if self.quota_bytes is not None and self.quota_bytes < self.max_bytes:
            return ArchiveOverQuota(max(0, self.quota_bytes))
        return UnsafeArchiveError(
            f"the archive decompresses to more than {self.max_bytes} bytes, the allowed size (a zip bomb?); "
            "upload a smaller model",
            status=413,
        )


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
    for info in tf:  # one header at a time (getmembers() would read every header before the first check)
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


def _copy_capped(src: BinaryIO, dest: Path, budget: int, limits: ArchiveLimits) -> int:
    """Copy until EOF; fail as soon as more than `budget` bytes came out (headers may lie)."""
    written = 0
    with dest.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise limits.over()
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


def _too_many(limits: ArchiveLimits) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"the archive holds more than {limits.max_files} entries, folders included (CRUCIBLE_MAX_ARCHIVE_FILES); "
        "archive only the model folder",
        status=413,
    )


def _zip_declared_entries(blob: bytes) -> int | None:
    """The entry count a zip's end-of-central-directory record declares (None: not a zip, or zip64),
    read before zipfile parses the whole central directory."""
    end = blob.rfind(b"PK\x05\x06", max(0, len(blob) - 65557))
    if end < 0 or end + 22 > len(blob):
        return None
    total = int.from_bytes(blob[end + 10 : end + 12], "little")
    return None if total == 0xFFFF else total


def _extract(blob: bytes, dest: Path, limits: ArchiveLimits) -> list[str]:
    declared_entries = _zip_declared_entries(blob)
    if declared_entries is not None and declared_entries > limits.max_files:
        raise _too_many(limits)
    planned: list[_Member] = []
    seen: set[str] = set()
    folders: set[str] = set()
    declared = 0
    for entries, m in enumerate(members(blob), 1):  # members are read lazily: the count stops the reading
        if entries > limits.max_files:
            raise _too_many(limits)
        if m.is_dir:
            folders.add(_check_member_name(m.name))
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
        folders.update(str(parent) for parent in PurePosixPath(name).parents if str(parent) != ".")
        planned.append(m)
        declared += max(0, m.size)
        if declared > limits.budget:
            raise limits.over()
    if not planned:
        raise UnsafeArchiveError("the archive holds no files")
    clash = sorted(seen & folders)
    if clash:
        raise UnsafeArchiveError(f"{clash[0]} is both a file and a folder in the archive; repack it")
    dest.mkdir(parents=True)
    try:
        budget = limits.budget
        names = []
        for m in planned:
            name = _check_member_name(m.name)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with m.open() as src:  # type: ignore[operator]
                budget -= _copy_capped(src, target, budget, limits)
            names.append(name)
        return names
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
