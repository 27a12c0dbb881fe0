"""`JobRunContext`: the RunContext a job gets on a worker, backed by the database and object store.

The method's thread only appends to in-memory buffers; a reporter thread heart-beats the lease,
learns about cancellation and flushes metrics, logs and progress in batches (one fenced
transaction per flush), which is what makes logging cheap. Checkpoints flush first, upload, then
publish a row, so a resume never sees a partial file and never lacks the metrics logged before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from models.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from models.context import ARTIFACT_KINDS, artifact_bytes, check_artifact_name, clean_metrics
from models.datasets import Dataset
from workers import lifecycle
from workers.db import session_scope
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import DEFAULT_PROJECT, Artifact, Job, LogChunk, Metric, RegisteredModel, latest_version


def upsert_metrics(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert points; a replayed (job, name, step) overwrites instead of duplicating.

    One compiled statement executed over all rows (executemany): building a multi-row VALUES
    statement per flush spent ~95% of the time compiling SQL (bench/tracking.py).
    """
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    stmt = insert(Metric.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "name", "step"],
        set_={"value": stmt.excluded.value, "time": stmt.excluded.time, "attempt": stmt.excluded.attempt},
    )
    session.connection().execute(stmt, rows)


def append_log(session: Session, job_id: str, attempt: int, text: str) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    session.add(LogChunk(job_id=job_id, offset=job.log_bytes, text=text, attempt=attempt))
    job.log_bytes = job.log_bytes + len(text.encode("utf-8"))


@dataclass
class _Buffers:
    metrics: list[dict[str, Any]]
    logs: list[str]
    progress: tuple[int, int, str] | None


T = TypeVar("T")
DB_RETRY_WAITS_S = (0.5, 1, 2, 4, 8, 16, 30)  # about a minute: a Postgres restart or failover


def through_db_outage(write: Callable[[], T]) -> T:
    """Run a database write, retrying with backoff while the database is unreachable.

    Only connection-level errors are retried; a fenced (stale) attempt or a constraint violation is
    an answer, not an outage, and propagates at once.
    """
    for wait_s in DB_RETRY_WAITS_S:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            print(
                f"[crucible] database unreachable ({type(exc).__name__}); retrying in {wait_s} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait_s)
    return write()


def _checkpoint_attempt(key: str) -> int:
    """The attempt that wrote a checkpoint object (`…/step-000000010-a2.safetensors` → 2); unknown names
    count as later than any attempt, so a sweep leaves them alone."""
    match = re.search(r"-a(\d+)\.safetensors$", key)
    return int(match.group(1)) if match else sys.maxsize


class JobRunContext:
    """RunContext for one attempt of one job."""

    def __init__(self, job: Job, dataset: Dataset | None, settings: Settings, store: ObjectStore, device: str):
        self.job_id = job.id
        self.project = job.project
        self.attempt = job.attempt
        self.parent_id = job.parent_id
        self.dataset = dataset
        self.seed = job.seed
        self.device = device
        self.resources: Mapping[str, float] = dict(job.resources or {})
        self.settings = settings
        self.store = store
        self.cache_dir = settings.cache_dir  # trained-once base models and classifiers, shared by jobs
        self._db = settings.database_url
        self._lock = threading.Lock()  # guards the buffers
        self._io_lock = threading.Lock()  # one flush at a time
        self._buf = _Buffers([], [], None)
        self._cancel = threading.Event()
        self._lost = threading.Event()  # this attempt was fenced off
        self._registered: Counter[str] = Counter()  # model registrations of this attempt, by name
        self.cancel_observed = False
        self._stop = threading.Event()
        self._flush_now = threading.Event()  # wakes the reporter when a batch is full
        self._last_flush = time.monotonic()
        self._last_line = -float("inf")  # when the log last got a metrics line (see _log_line)
        self._workdir = tempfile.TemporaryDirectory(prefix=f"crucible-{job.id}-")  # 0700, removed at close
        self.workdir = Path(self._workdir.name)
        self._reporter = threading.Thread(target=self._report_loop, name=f"reporter-{job.id}", daemon=True)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._reporter.start()

    def close(self) -> None:
        """Stop the reporter, flush everything and sweep stray checkpoint objects (also on failure)."""
        self._stop.set()
        self._flush_now.set()
        if self._reporter.is_alive():
            self._reporter.join(timeout=10)
        try:
            self.flush()
            if not self._lost.is_set():
                self.sweep_checkpoints()
        finally:
            self._workdir.cleanup()

    def _report_loop(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            self._flush_now.wait(0.25)
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_s
                    with session_scope(self._db) as s:
                        status = lifecycle.heartbeat(s, self.job_id, self.attempt, self.settings.lease_s)
                    if status is None:
                        self._lost.set()
                        self._cancel.set()
                    elif status == "cancelling":
                        self._cancel.set()
                if self._flush_now.is_set() or now - self._last_flush >= self.settings.metric_flush_s:
                    self._flush_now.clear()
                    self.flush()
            except lifecycle.StaleAttempt:
                self._lost.set()
                self._cancel.set()
            except Exception as exc:  # a DB hiccup must not kill the job; the next beat retries
                print(f"[crucible] reporter: {type(exc).__name__}: {exc}", flush=True)

    # -- metrics, logs, progress ---------------------------------------------
    def log(self, step: int, **metrics: float) -> None:
        now = time.time()
        rows = [
            {"job_id": self.job_id, "name": n, "step": s, "value": v, "time": now, "attempt": self.attempt}
            for n, s, v in clean_metrics(step, metrics)
        ]
        with self._lock:
            self._buf.metrics.extend(rows)
            pending = len(self._buf.metrics)
        self._log_line(step, rows)
        if pending >= 20 * self.settings.metric_flush_points:
            self.flush()  # the reporter cannot keep up: apply back-pressure rather than grow without bound
        elif pending >= self.settings.metric_flush_points:
            self._flush_now.set()

    def _log_line(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A readable line of the metrics just logged, at most every `log_line_every_s` seconds.

        Methods log metrics, not prose; without this a job's log (`crucible logs -f`) says nothing for
        the whole run. Throttled by time rather than by step so a fast loop cannot flood the log and a
        slow one still shows each epoch.
        """
        every = self.settings.log_line_every_s
        now = time.monotonic()
        if not rows or every <= 0 or now - self._last_line < every:
            return
        self._last_line = now
        shown = "  ".join(f"{r['name']} {r['value']:.4g}" for r in rows[:8])
        more = f"  (+{len(rows) - 8} more)" if len(rows) > 8 else ""
        self.write_log(f"[step {step}] {shown}{more}\n")

    def write_log(self, text: str) -> None:
        with self._lock:
            self._buf.logs.append(text)

    def progress(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            self._buf.progress = (int(done), int(total), str(message))

    def flush(self) -> None:
        """Write buffered metrics, log text and progress in one fenced transaction."""
        with self._io_lock:
            with self._lock:
                buf, self._buf = self._buf, _Buffers([], [], None)
            self._last_flush = time.monotonic()
            if not (buf.metrics or buf.logs or buf.progress) or self._lost.is_set():
                return
            try:
                with session_scope(self._db) as s:
                    lifecycle.fence(s, self.job_id, self.attempt)
                    upsert_metrics(s, buf.metrics)
                    if buf.logs:
                        append_log(s, self.job_id, self.attempt, "".join(buf.logs))
                    if buf.progress:
                        lifecycle.set_progress(s, self.job_id, self.attempt, *buf.progress)
            except lifecycle.StaleAttempt:
                self._lost.set()
                self._cancel.set()
            except Exception:
                with self._lock:  # keep the points for the next try rather than lose them
                    self._buf.metrics[:0] = buf.metrics
                    self._buf.logs[:0] = buf.logs
                    self._buf.progress = self._buf.progress or buf.progress
                raise

    # -- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Metrics first, then the object, then its row; a database that restarts meanwhile is waited
        for (a checkpoint is the one write a long job cannot afford to lose to a blip)."""
        through_db_outage(self.flush)
        blob = encode_checkpoint(state, step)
        name = f"checkpoints/step-{int(step):09d}-a{self.attempt}.safetensors"
        stored = self.store.put_bytes(f"jobs/{self.job_id}/{name}", blob)
        stale_keys = through_db_outage(lambda: self._publish_checkpoint(name, stored, step))
        for key in stale_keys:  # rows are gone first, so no reader can pick a deleted object
            try:
                self.store.delete(key)
            except Exception as exc:  # the store is away: the job goes on, and sweep_checkpoints retries
                print(f"[crucible] could not delete {key} yet ({type(exc).__name__})", file=sys.stderr, flush=True)

    def sweep_checkpoints(self) -> list[str]:
        """Delete this job's checkpoint objects that no row names, from this attempt and earlier ones.

        An object is written before its row and deleted after it, so a process killed in between (a worker
        killed with -9, a fenced-off attempt whose row was refused, a delete while the store was down)
        leaves an object nothing refers to: bench/chaos.py found such orphans. Once the method has
        returned, this attempt writes no more checkpoints and earlier attempts are fenced off, so what
        no row names is garbage. Later attempts' objects (a newer attempt took over meanwhile) are never
        touched. Best effort: a store that is down leaves them for the next attempt or the job's deletion.
        """
        prefix = f"jobs/{self.job_id}/checkpoints/"
        try:
            with session_scope(self._db) as s:
                named = set(
                    s.scalars(select(Artifact.key).where(Artifact.job_id == self.job_id, Artifact.kind == "checkpoint"))
                )
            stray = [k for k in self.store.list(prefix) if k not in named and _checkpoint_attempt(k) <= self.attempt]
            for key in stray:
                self.store.delete(key)
            return stray
        except Exception as exc:
            print(f"[crucible] checkpoint sweep skipped ({type(exc).__name__})", file=sys.stderr, flush=True)
            return []

    def _publish_checkpoint(self, name: str, stored: Any, step: int) -> list[str]:
        with session_scope(self._db) as s:
            lifecycle.fence(s, self.job_id, self.attempt)
            s.execute(delete(Artifact).where(Artifact.job_id == self.job_id, Artifact.name == name))
            s.add(
                Artifact(
                    job_id=self.job_id,
                    name=name,
                    kind="checkpoint",
                    key=stored.key,
                    size=stored.size,
                    sha256=stored.sha256,
                    content_type="application/x-safetensors",
                    step=int(step),
                    attempt=self.attempt,
                )
            )
            old = s.scalars(
                select(Artifact)
                .where(Artifact.job_id == self.job_id, Artifact.kind == "checkpoint")
                .order_by(Artifact.step.desc(), Artifact.id.desc())
                .offset(self.settings.keep_checkpoints)
            ).all()
            stale_keys = [a.key for a in old]
            for a in old:
                s.delete(a)
        return stale_keys

    def load_checkpoint(self) -> Checkpoint | None:
        for job_id in (self.job_id, self.parent_id):
            if not job_id:
                continue
            with session_scope(self._db) as s:
                row = s.scalars(
                    select(Artifact)
                    .where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
                    .order_by(Artifact.step.desc(), Artifact.id.desc())
                    .limit(1)
                ).first()
            if row is not None:
                blob = self.store.get_bytes(row.key)
                if hashlib.sha256(blob).hexdigest() != row.sha256:
                    raise ValueError(f"checkpoint {row.name} does not match its recorded sha256")
                return decode_checkpoint(blob)
        return None

    # -- artifacts ------------------------------------------------------------
    def save_artifact(self, name: str, data: Any, kind: str = "file") -> str:
        name = check_artifact_name(name)
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        payload = artifact_bytes(data)
        if isinstance(payload, Path) and payload.is_dir():
            for f in sorted(p for p in payload.rglob("*") if p.is_file()):
                self._publish_artifact(f"{name}/{f.relative_to(payload).as_posix()}", f, kind)
        else:
            self._publish_artifact(name, payload, kind)
        return name

    def _publish_artifact(self, name: str, payload: bytes | Path, kind: str) -> None:
        check_artifact_name(name)
        key = f"jobs/{self.job_id}/artifacts/{name}"
        stored = self.store.put_file(key, payload) if isinstance(payload, Path) else self.store.put_bytes(key, payload)
        ctype = mimetypes.guess_type(name)[0] or (
            "application/json"
            if kind in ("json", "table")
            else "text/plain"
            if kind == "text"
            else "application/octet-stream"
        )
        with session_scope(self._db) as s:
            lifecycle.fence(s, self.job_id, self.attempt)
            s.execute(delete(Artifact).where(Artifact.job_id == self.job_id, Artifact.name == name))
            s.add(
                Artifact(
                    job_id=self.job_id,
                    name=name,
                    kind=kind,
                    key=stored.key,
                    size=stored.size,
                    sha256=stored.sha256,
                    content_type=ctype,
                    attempt=self.attempt,
                )
            )

    # -- models ---------------------------------------------------------------
    def register_model(self, name: str, path: Path, config: Mapping[str, Any] | None = None) -> str:
        """Register the folder (or file) as the next version of `name`, once per job: an attempt that
        re-runs the end of a job whose earlier attempt registered the model and then was lost before its
        final state (killed, its Ray driver gone) gets that version back instead of a second one, as
        bench/chaos.py found (one job, two versions). The n-th registration of a name in an attempt
        matches the job's n-th version of it, so a run that registers a name repeatedly stays in step."""
        check_artifact_name(name)
        nth = self._registered[name]
        self._registered[name] += 1
        with session_scope(self._db) as s:
            earlier = list(
                s.scalars(
                    select(RegisteredModel.version)
                    .where(
                        RegisteredModel.project == self.project,
                        RegisteredModel.name == name,
                        RegisteredModel.source_job_id == self.job_id,
                    )
                    .order_by(RegisteredModel.version)
                )
            )
        if nth < len(earlier):
            return f"{name}@{earlier[nth]}"
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        # Each try uploads under a prefix of its own (the version, then this job and attempt): two jobs
        # that pick the same next version must not write over, or on losing the race delete, each other's
        # files, and what a refused registration uploaded is removed again (no object without its row).
        for _ in range(5):  # a concurrent registration may take our version number; then take the next
            with session_scope(self._db) as s:
                version = (latest_version(s, self.project, name) or 0) + 1
            prefix = f"models/{self.project}/{name}/{version}/{self.job_id}-a{self.attempt}"
            manifest = {}
            try:
                for f in files:
                    rel = f.name if path.is_file() else f.relative_to(path).as_posix()
                    stored = self.store.put_file(f"{prefix}/{rel}", f)
                    manifest[rel] = {"size": stored.size, "sha256": stored.sha256}
                with session_scope(self._db) as s:
                    lifecycle.fence(s, self.job_id, self.attempt)
                    s.add(
                        RegisteredModel(
                            project=self.project,
                            name=name,
                            version=version,
                            source_job_id=self.job_id,
                            key=prefix,
                            config=json.loads(json.dumps(dict(config or {}), default=str)),
                            files=manifest,
                        )
                    )
                return f"{name}@{version}"
            except IntegrityError:
                self.store.delete_prefix(prefix + "/")
            except BaseException:  # fenced off (a newer attempt runs), or the store or database failed
                with contextlib.suppress(Exception):
                    self.store.delete_prefix(prefix + "/")
                raise
        raise RuntimeError(f"could not allocate a version for model {name!r}")

    def load_model(self, ref: str) -> Path:
        return resolve_model(ref, self.settings, self.store, self.project)

    # -- cancellation ---------------------------------------------------------
    def request_cancel(self) -> None:
        self._cancel.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def cancelled(self) -> bool:
        if self._cancel.is_set():
            self.cancel_observed = True
            return True
        return False


def resolve_model(ref: str, settings: Settings, store: ObjectStore, project: str = DEFAULT_PROJECT) -> Path:
    """`name`, `name@latest` or `name@N` of the project's registry (cached locally, checked by sha256),
    or a local folder under one of the allowed import roots."""
    local = Path(ref)
    if local.is_absolute():
        roots = settings.import_root_paths
        target = local.resolve()
        if not any(target.is_relative_to(r) for r in roots) or not target.is_dir():
            raise PermissionError(f"{ref} is not a folder under an allowed import root ({', '.join(map(str, roots))})")
        return target
    name, _, version = ref.partition("@")
    with session_scope(settings.database_url) as s:
        q = select(RegisteredModel).where(RegisteredModel.project == project, RegisteredModel.name == name)
        q = (
            q.order_by(RegisteredModel.version.desc())
            if version in ("", "latest")
            else q.where(RegisteredModel.version == int(version))
        )
        row = s.scalars(q.limit(1)).first()
    if row is None:
        raise KeyError(f"no registered model {ref!r}")
    dest = settings.cache_dir / "models" / project / name / str(row.version)
    marker = dest / ".complete"
    # the marker holds the manifest's digest: a version number deleted and registered again (versions are
    # max + 1) names other files, and a cache of the deleted model must not be served for it
    manifest = hashlib.sha256(json.dumps(row.files, sort_keys=True).encode()).hexdigest()
    if not marker.exists() or marker.read_text() != manifest:
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, info in row.files.items():
            target = tmp / rel
            store.download(f"{row.key}/{rel}", target)
            if hashlib.sha256(target.read_bytes()).hexdigest() != info["sha256"]:
                raise ValueError(f"model file {rel} of {name}@{row.version} fails its sha256 check")
        (tmp / ".complete").write_text(manifest)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest
