"""SQLAlchemy 2.0 tables, one model for SQLite (embedded) and Postgres (production).

The `jobs` row is the truth about a job. `attempt` is a fencing token: metric, log, checkpoint and
final-state writes carry the attempt that made them and are refused once the job has moved on.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

STATUSES = ("queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled")
ACTIVE = ("starting", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")

# Each role can do everything the ones before it can. `operator` runs the server: the key `crucible up`
# makes for the `default` project; it alone creates projects and sets their quotas.
ROLES = ("viewer", "member", "admin", "operator")
OPERATOR = "operator"
DEFAULT_PROJECT = "default"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, sortable by creation."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Project(Base):
    """The unit of isolation: every job, dataset, model and deployment belongs to one."""

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)  # None = the service-wide default
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column()  # read-only since then; None = active


class ApiKey(Base):
    """A bearer key of one project. Only its sha256 is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, so a person can tell keys apart
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str | None] = mapped_column(String(26))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    """Who did what to which thing, and when: submit, cancel, delete, upload, deploy, key changes."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(26))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    request_id: Mapped[str | None] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), default=DEFAULT_PROJECT, index=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str | None] = mapped_column(String(128))
    mode: Mapped[str] = mapped_column(String(16), default="run")  # run | reproduce
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str] = mapped_column(String(256), default="")
    failure_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(String(26))
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_jobs_created", "created_at", "id"),)


class Metric(Base):
    """One point of a metric series; (job, name, step) is unique so a replayed flush is harmless."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float] = mapped_column(Float)
    time: Mapped[float] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (UniqueConstraint("job_id", "name", "step", name="uq_metric_point"),)


class LogChunk(Base):
    """An append-only piece of a job's log; `offset` is its first byte in the whole log."""

    __tablename__ = "log_chunks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    offset: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (Index("ix_log_chunks_job_offset", "job_id", "offset"),)


class Artifact(Base):
    """A stored object of a job. Published (inserted) only after its upload completed."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(128), default="application/octet-stream")
    step: Mapped[int | None] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifact_name"),)


class RegisteredModel(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), default=DEFAULT_PROJECT, index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    source_job_id: Mapped[str | None] = mapped_column(String(26))
    key: Mapped[str] = mapped_column(String(1024))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # relative path -> {size, sha256}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("project", "name", "version", name="uq_model_version"),)


class DatasetRow(Base):
    """An uploaded dataset (built-ins live in code, not here)."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), default=DEFAULT_PROJECT, index=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("project", "name", name="uq_dataset_name"),)


def latest_version(session: Session, project: str, name: str) -> int | None:
    """The highest registered version of model `name` in `project`; None when it has none."""
    return session.scalar(
        select(func.max(RegisteredModel.version)).where(
            RegisteredModel.project == project, RegisteredModel.name == name
        )
    )


class Upload(Base):
    """A resumable upload: a file sent in parts, each appended at the offset the server has reached.

    The parts live in the object store (`uploads/<project>/<id>/<offset>-<token>`), so any API process can take
    the next part and an interrupted client resumes from `offset`. `parts` lists the accepted ones in order;
    `offset` advances only by a compare-and-set on the old value, so two clients racing at one offset cannot
    both append. The file is used once complete (a model import names it) and then deleted with its parts.
    """

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), default=DEFAULT_PROJECT, index=True)
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)  # declared when the upload is created
    sha256: Mapped[str | None] = mapped_column(String(64))  # optional, checked when the file is used
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    parts: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [[offset, size, key], ...]
    created_by: Mapped[str | None] = mapped_column(String(26))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class Deployment(Base):
    """A registered model served warm behind an inference endpoint (LLM chat/completions or images).

    `engine` holds the deployment's engine options (KV cache, attention, decoding; sampler defaults),
    validated when the deployment is created so a bad combination fails then, not mid-generation.
    """

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), default=DEFAULT_PROJECT, index=True)
    name: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(160))  # the registered model as `name@version`
    kind: Mapped[str] = mapped_column(String(16))  # llm | diffusion
    engine: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="ready")  # ready | failed | deleted
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(26))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("project", "name", name="uq_deployment_name"),)
