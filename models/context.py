"""`RunContext`: a method's only door to the outside world, and an in-memory implementation.

A method receives a context and reports through it (metrics, progress, checkpoints, artifacts,
models) without knowing whether it runs in a notebook, a test, a local subprocess, a Celery worker
or a Ray task — the Ray Train `train.report` idea. `InMemoryRunContext` runs any method with no
server: tests and notebooks use it, and so does `crucible reproduce`.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import torch
from threadpoolctl import threadpool_limits

from models.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from models.datasets import Dataset

ARTIFACT_KINDS = ("checkpoint", "image", "plot", "table", "model", "text", "json", "file", "log")
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ @+=-]{0,127}$")


class ArtifactNameError(ValueError):
    """An artifact or model name that could escape its folder or is not portable."""


def check_artifact_name(name: str) -> str:
    """Accept relative POSIX names of safe segments only: no `..`, absolute paths, backslashes or NULs."""
    if not name or "\\" in name or "\x00" in name or "%" in name or name.startswith("/"):
        raise ArtifactNameError(f"artifact name {name!r} must be a relative path like 'plots/curve.png'")
    parts = PurePosixPath(name).parts
    if not parts:  # "." and "./" normalise to nothing: a name must name something
        raise ArtifactNameError(f"artifact name {name!r} names no file; use a path like 'plots/curve.png'")
    if any(p in (".", "..") or not _SAFE_SEGMENT.match(p) for p in parts) or len(parts) > 8:
        raise ArtifactNameError(f"artifact name {name!r}: use up to 8 segments of letters, digits and ._-")
    return "/".join(parts)


def artifact_bytes(data: Any) -> bytes | Path:
    """Turn what a method hands `save_artifact` into bytes or a path to upload.

    bytes → as is; str → UTF-8 text; a `Path` → that file or folder; dict/list → JSON;
    anything with `savefig` (a matplotlib figure) → PNG.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, Path):
        if not data.exists():
            raise FileNotFoundError(f"artifact path {data} does not exist")
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (dict, list)):
        return json.dumps(data, indent=2, default=float).encode("utf-8")
    if hasattr(data, "savefig"):
        buf = io.BytesIO()
        data.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()
    raise TypeError(f"cannot store a {type(data).__name__} as an artifact; pass bytes, str, Path, dict or a figure")


@dataclass(frozen=True)
class MetricPoint:
    name: str
    step: int
    value: float
    time: float


@runtime_checkable
class RunContext(Protocol):
    """What a method may use. Implementations: `InMemoryRunContext`, `workers.context.JobRunContext`."""

    job_id: str
    dataset: Dataset | None
    device: str
    seed: int
    resources: Mapping[str, float]
    workdir: Path  # a private scratch folder for this run (model folders before register_model, …)

    def log(self, step: int, **metrics: float) -> None: ...

    def progress(self, done: int, total: int, message: str = "") -> None: ...

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None: ...

    def load_checkpoint(self) -> Checkpoint | None: ...

    def save_artifact(self, name: str, data: Any, kind: str = "file") -> str: ...

    def register_model(self, name: str, path: Path, config: Mapping[str, Any] | None = None) -> str: ...

    def load_model(self, ref: str) -> Path: ...

    def cancelled(self) -> bool: ...


class Cancelled(InterruptedError):
    """A loop saw `ctx.cancelled()` and stopped. `MethodSpec.invoke` turns it into a clean return, so a
    method never checks for a half-finished result: the loop that notices raises, the registry catches."""


def stop_if_cancelled(ctx: RunContext) -> None:
    """Raise `Cancelled` when the run has been asked to stop (call it once per step or batch)."""
    if ctx.cancelled():
        raise Cancelled(f"run {ctx.job_id} cancelled")


@contextmanager
def cpu_threads(resources: Mapping[str, float]) -> Iterator[int]:
    """Run torch and BLAS on the job's CPUs only (`resources["cpus"]`, default 1), then restore.

    Small models gain nothing from more threads, and on a shared machine a thread per core makes
    every job slower (several-fold for sklearn's lbfgs and for batch-64 MLPs). The thread count is
    also part of a run's identity: float reductions, and so a resumed run's bit-exactness, depend on
    it. `MethodSpec.invoke` and `run_reproduction` apply it around every run.
    """
    n = max(1, int(resources.get("cpus", 1)))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        torch.set_num_threads(before)


def shared_cache_dir(ctx: Any) -> Path:
    """Where trained-once things (tiny base models, evaluation classifiers) are kept between runs.

    A job's context names the service's cache (`$CRUCIBLE_HOME/cache`); a context without one (tests,
    `crucible reproduce` outside the service) uses `.crucible/cache`, the embedded default's.
    """
    root = getattr(ctx, "cache_dir", None)
    return Path(root) if root is not None else Path(".crucible") / "cache"


def clean_metrics(step: int, metrics: Mapping[str, float]) -> list[tuple[str, int, float]]:
    """Validate one `log` call: integer step ≥ 0, names, finite-or-NaN floats."""
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"metric step must be a non-negative integer, got {step!r}")
    rows = []
    for name, value in metrics.items():
        v = float(value)
        if math.isinf(v):
            v = math.copysign(1e308, v)
        rows.append((name, int(step), v))
    return rows


@dataclass
class InMemoryRunContext:
    """Runs a method with no server: everything stays in this object and a private temp folder."""

    dataset: Dataset | None = None
    seed: int = 0
    device: str = "cpu"
    resources: Mapping[str, float] = field(default_factory=lambda: {"cpus": 1})
    job_id: str = "in-memory"
    on_progress: Callable[[int, int, str], None] | None = None
    workdir: Path | None = None

    def __post_init__(self) -> None:
        self.metrics: list[MetricPoint] = []
        self.progress_state: tuple[int, int, str] = (0, 0, "")
        self.checkpoints: list[bytes] = []
        self.artifacts: dict[str, tuple[str, bytes]] = {}
        self.models: dict[str, list[Path]] = {}
        self._cancel = threading.Event()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="crucible-run-")
            self.workdir = Path(self._tmp.name)

    # -- metrics and progress -------------------------------------------------
    def log(self, step: int, **metrics: float) -> None:
        now = time.time()
        self.metrics.extend(MetricPoint(n, s, v, now) for n, s, v in clean_metrics(step, metrics))

    def history(self, name: str) -> list[tuple[int, float]]:
        return [(p.step, p.value) for p in self.metrics if p.name == name]

    def latest(self, name: str) -> float | None:
        series = self.history(name)
        return series[-1][1] if series else None

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.progress_state = (int(done), int(total), message)
        if self.on_progress:
            self.on_progress(int(done), int(total), message)

    # -- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        self.checkpoints.append(encode_checkpoint(state, step))

    def load_checkpoint(self) -> Checkpoint | None:
        return decode_checkpoint(self.checkpoints[-1]) if self.checkpoints else None

    # -- artifacts and models -------------------------------------------------
    def save_artifact(self, name: str, data: Any, kind: str = "file") -> str:
        name = check_artifact_name(name)
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        payload = artifact_bytes(data)
        if isinstance(payload, Path):
            files = [payload] if payload.is_file() else sorted(p for p in payload.rglob("*") if p.is_file())
            for f in files:
                sub = name if payload.is_file() else f"{name}/{f.relative_to(payload).as_posix()}"
                self.artifacts[sub] = (kind, f.read_bytes())
        else:
            self.artifacts[name] = (kind, payload)
        return name

    def artifact_path(self, name: str) -> Path:
        """Write an in-memory artifact to the workdir (for eyes and tests)."""
        out = self.workdir / "artifacts" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.artifacts[name][1])
        return out

    def register_model(self, name: str, path: Path, config: Mapping[str, Any] | None = None) -> str:
        check_artifact_name(name)
        versions = self.models.setdefault(name, [])
        dest = self.workdir / "models" / name / str(len(versions) + 1)
        shutil.copytree(path, dest) if Path(path).is_dir() else (dest.mkdir(parents=True), shutil.copy2(path, dest))
        (dest / "crucible-model.json").write_text(json.dumps(dict(config or {}), default=str))
        versions.append(dest)
        return f"{name}@{len(versions)}"

    def load_model(self, ref: str) -> Path:
        name, _, version = ref.partition("@")
        if name in self.models:
            versions = self.models[name]
            return versions[-1] if version in ("", "latest") else versions[int(version) - 1]
        local = Path(ref)
        if local.is_dir():
            return local
        raise KeyError(f"no model {ref!r} in this context and no such local folder")

    # -- cancellation ---------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()
