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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from models.context import ArtifactNameError, check_artifact_name

# What a Hugging Face / diffusers folder is made of once pickles are excluded.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".jinja", ".model", ".tiktoken", ".py.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".h5", ".msgpack")
# the shard index of pickled weights (pytorch_model.bin.index.json): it names only files that are left out
PICKLE_INDEXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")


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


def _check_member_name(raw: str, folder: bool = False) -> str:
    """The member's name normalised (`./config.json` → `config.json`); a folder member naming the archive's own
    top (`.`, `./`: what `tar -C folder -czf m.tar.gz .` writes first) is "" (the caller skips it)."""
    stripped = raw.rstrip("/")
    if folder and stripped in ("", ".") and raw:
        return ""
    if any(ord(c) < 32 or ord(c) == 127 for c in stripped):
        raise UnsafeArchiveError(f"archive member {raw!r} has control characters in its name")
    try:
        return check_artifact_name(stripped)
    except ArtifactNameError:
        raise UnsafeArchiveError(
            f"archive member {raw!r} would land outside the model folder "
            "(absolute path, `..` or unusual characters); repack it with relative names"
        ) from None


Source = bytes | BinaryIO  # the archive in memory, or a seekable file (an upload spooled to disk)


def _stream(source: Source) -> BinaryIO:
    """A readable, seekable view of the archive, at its start."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    source.seek(0)
    return source


def _head(source: Source, size: int) -> bytes:
    return bytes(source[:size]) if isinstance(source, (bytes, bytearray)) else _stream(source).read(size)


def _tail(source: Source, size: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[-size:])
    stream = _stream(source)
    stream.seek(0, io.SEEK_END)
    stream.seek(max(0, stream.tell() - size))
    return stream.read(size)


def _zip_members(source: Source) -> Iterator[_Member]:
    zf = zipfile.ZipFile(_stream(source))
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


# how each archive format starts: a file that starts like one but does not open is that archive, damaged
_MAGIC = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"))


def _damaged_format(source: Source) -> str | None:
    """The archive format `source` starts as (by its magic bytes), if any: zip, gzip, … or tar."""
    blob = _head(source, 262)
    for magic, name in _MAGIC:
        if blob.startswith(magic):
            return name
    return "tar" if blob[257:262] == b"ustar" else None


def members(source: Source) -> Iterator[_Member]:
    if zipfile.is_zipfile(_stream(source)):
        return _zip_members(source)
    try:
        tf = tarfile.open(fileobj=_stream(source), mode="r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        damaged = _damaged_format(source)
        if damaged is not None:  # a zip without its central directory, a gzip cut short: truncated or corrupt
            raise UnsafeArchiveError(
                f"the {damaged} archive is corrupt or truncated (it starts as a {damaged} file but cannot be read "
                "to its end); upload it again, or pack the folder again",
                status=422,
            ) from None
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


def safe_extract(source: Source, dest: Path, limits: ArchiveLimits, skipped: list[str] | None = None) -> list[str]:
    """Extract into `dest` (created, must not exist) and return the relative file names.

    Pickled files are refused (415), or, given a `skipped` list, left out unread and named there: a Hugging Face
    snapshot carries its weights both as `.bin` pickles and as `.safetensors`, and the safetensors are all a
    model needs (the caller refuses a folder that then has no safetensors). On any violation nothing is left
    behind.
    """
    try:
        return _extract(source, dest, limits, skipped)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeArchiveError(
            f"the archive is corrupt or truncated ({type(exc).__name__}: {exc}); upload it again, or pack it again"
        ) from None


def _hidden(raw: str) -> bool:
    """A member under a dot-name (`.gitattributes`, `.cache/…`), not `.`/`..` (those are checked as names are)."""
    parts = [p for p in raw.rstrip("/").split("/") if p not in ("", ".")]
    return any(p.startswith(".") and p != ".." for p in parts) and ".." not in parts


def _too_many(limits: ArchiveLimits) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"the archive holds more than {limits.max_files} entries, folders included (CRUCIBLE_MAX_ARCHIVE_FILES); "
        "archive only the model folder",
        status=413,
    )


def _zip_declared_entries(source: Source) -> int | None:
    """The entry count a zip's end-of-central-directory record declares (None: not a zip, or zip64),
    read before zipfile parses the whole central directory."""
    blob = _tail(source, 65557 + 22)
    end = blob.rfind(b"PK\x05\x06", max(0, len(blob) - 65557))
    if end < 0 or end + 22 > len(blob):
        return None
    total = int.from_bytes(blob[end + 10 : end + 12], "little")
    return None if total == 0xFFFF else total


def _extract(source: Source, dest: Path, limits: ArchiveLimits, skipped: list[str] | None) -> list[str]:
    declared_entries = _zip_declared_entries(source)
    if declared_entries is not None and declared_entries > limits.max_files:
        raise _too_many(limits)
    planned: list[_Member] = []
    seen: set[str] = set()
    folders: set[str] = set()
    declared = 0
    for entries, m in enumerate(members(source), 1):  # members are read lazily: the count stops the reading
        if entries > limits.max_files:
            raise _too_many(limits)
        if skipped is not None and _hidden(m.name):
            if not m.is_dir:
                skipped.append(m.name.removeprefix("./"))  # .gitattributes, .cache/huggingface/…: a hub's bookkeeping
            continue
        if m.is_dir:
            if folder := _check_member_name(m.name, folder=True):
                folders.add(folder)
            continue
        name = _check_member_name(m.name)
        suffix = "".join(PurePosixPath(name).suffixes[-1:]).lower()
        if skipped is not None and (suffix in PICKLE_SUFFIXES or name.lower().endswith(PICKLE_INDEXES)):
            skipped.append(name)  # never opened, never written: a snapshot's pickled copy of its weights
            continue
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


def tar_gz_stream(entries: Iterable[tuple[str, int, Iterable[bytes]]], mtime: float = 0) -> Iterator[bytes]:
    """A .tar.gz of (name, size, chunks) entries, produced as the chunks arrive: each member's header, its bytes
    and its padding go through one gzip stream, so a model of any size is served in constant memory (what
    `tarfile` in stream mode writes, without its need to read a whole member before returning)."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    for name, size, chunks in entries:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(mtime)
        out = gz.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        written = 0
        for chunk in chunks:
            written += len(chunk)
            out += gz.compress(chunk)
            if out:
                yield out
                out = b""
        if written != size:  # the stored object is not what its manifest says: stop rather than send a bad tar
            raise ValueError(f"{name}: {written} bytes read, the manifest says {size}")
        out += gz.compress(b"\0" * (-size % tarfile.BLOCKSIZE))
        if out:
            yield out
    yield gz.compress(b"\0" * (2 * tarfile.BLOCKSIZE)) + gz.flush()
