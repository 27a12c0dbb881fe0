"""What a reproduction record is tied to: the commit, the code it ran and the cached inputs it read.

- `code_fingerprint(module)`: a SHA-256 over the source of a method module and of every module of
  the `models` package it imports, directly or not (found by reading import statements, not by
  importing), so a record can be marked stale when any of that code changes and not when unrelated
  code does. The registry, the reproduction harness and this module are left out: they decide how
  a record is written, not what it measures.
- `recording_inputs()` / `note_input(name, digest)`: the trained-once artifacts (tiny base models,
  evaluation classifiers) and built-in datasets a run reads report a content hash here, so two
  records that disagree can be traced to different inputs (a base model trained on another
  machine, say) rather than to the method.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT_PACKAGE = "models"
# plumbing that shapes a record but not the numbers in it
NOT_FINGERPRINTED = frozenset({"models.registry", "models.reproduction", "models.provenance"})
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # 16 hex digits of SHA-256 over (path, source) pairs in path order
    files: tuple[str, ...]  # repository-relative paths that went into it


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_names(path: Path, package: str) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against `package`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=256)
def code_fingerprint(module: str) -> Fingerprint:
    """The fingerprint of `module` and the `models` modules it reaches through imports."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not (name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + ".")):
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imported_names(path, package):
            todo.extend(n for n in _with_parents(imported) if n not in seen)
    files = sorted({path for name, path in seen.items() if name not in NOT_FINGERPRINTED})
    digest = hashlib.sha256()
    rel = []
    for path in files:
        key = path.relative_to(REPOSITORY).as_posix() if path.is_relative_to(REPOSITORY) else path.name
        rel.append(key)
        digest.update(key.encode() + b"\0" + path.read_bytes() + b"\0")
    return Fingerprint(digest.hexdigest()[:16], tuple(rel))


@lru_cache(maxsize=1)
def current_commit() -> str:
    """The repository's HEAD commit (with `+dirty` when tracked files under models/ have changed), or
    'unknown' outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "models"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def library_versions(names: tuple[str, ...] = ("torch", "numpy", "transformers", "tokenizers", "diffusers")) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def numerics() -> dict[str, str]:
    """Which CPU kernels this process's float results come from (torch's SIMD level): training on other
    kernels gives a different model, so keys and records name them."""
    import torch

    return {"machine": platform.machine(), "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}


def trained_key(recipe: dict, module: str) -> str:
    """12 hex digits naming a trained-once artifact: its recipe, the fingerprint of the code that trains it
    (`module` and what it imports), the numerical libraries' versions and the CPU kernels (`numerics`). A
    recipe alone does not pin a model: other SIMD kernels, a new torch or an edit to the training code
    train a different one under the same recipe."""
    body = {
        "recipe": recipe,
        "code": code_fingerprint(module).digest,
        "libraries": library_versions(),
        "numerics": numerics(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- cached inputs ------------------------------------------------------------------------------

_recording = threading.local()


def note_input(name: str, digest: str) -> None:
    """Report that the running reproduction read the input `name` whose content hashes to `digest`."""
    inputs = getattr(_recording, "inputs", None)
    if inputs is not None:
        inputs[name] = digest


@contextmanager
def recording_inputs() -> Iterator[dict[str, str]]:
    """Collect `note_input` reports made on this thread inside the block (nested blocks share one)."""
    outer = getattr(_recording, "inputs", None)
    inputs: dict[str, str] = outer if outer is not None else {}
    _recording.inputs = inputs
    try:
        yield inputs
    finally:
        _recording.inputs = outer


def file_digest(path: Path, pattern: str = "*") -> str:
    """16 hex digits of SHA-256 over a file, or over a folder's files matching `pattern` (relative path,
    bytes) in path order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def weights_digest(folder: Path) -> str:
    """The digest of a model folder's weights alone (its JSON lineage names jobs and times, which differ
    between two trainings that produced the same tensors)."""
    return file_digest(folder, "*.safetensors")
