"""Request and response bodies of the HTTP API (pydantic). Shapes are a contract: extend, don't rename."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.problems import pattern_hint
from workers.tables import ApiKey, Artifact, AuditEvent, Job, RegisteredModel, Upload


def _json_number(value: Any) -> Any:
    """A request's numbers are JSON numbers, as its schema says: "5" and true are not 5 (3868.0 is 3868).
    In a list (token ids) each element is held to it."""
    if isinstance(value, list):
        for item in value:
            _json_number(item)
        return value
    if isinstance(value, (str, bool)):
        raise ValueError("must be a JSON number, not a string or boolean")
    return value


def _json_number_list(value: Any) -> Any:
    return _json_number(value) if isinstance(value, list) else value


def json_number_lists(*fields: str) -> Any:
    """As `json_numbers`, for fields that hold either a string or a list of numbers (token ids)."""
    return field_validator(*fields, mode="before")(_json_number_list)


def json_numbers(*fields: str) -> Any:
    """A model's validator holding `fields` to JSON numbers (pydantic's lax mode would parse "5"):
    `_numbers = json_numbers("seed", "n")` in the class body."""
    return field_validator(*fields, mode="before")(_json_number)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1, gt=0, le=256, description="CPU cores the job needs")
    gpus: float = Field(0, ge=0, le=16, description="GPUs; the job runs on cuda when > 0 and one is present")
    memory_gb: float | None = Field(None, gt=0, le=4096)

    _numbers = json_numbers("cpus", "gpus", "memory_gb")


class JobCreate(BaseModel):
    """A job spec: which method, on which dataset, with which params."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"method": "ldr", "dataset": "digits", "params": {"noise_rate": 0.4}}]},
    )

    method: str = Field(..., min_length=1, max_length=64, description="a method id from /api/v1/methods")
    dataset: str | None = Field(None, max_length=128, description="a dataset name from /api/v1/datasets")
    params: dict[str, Any] = Field(default_factory=dict, description="validated against the method's params schema")
    mode: Literal["run", "reproduce"] = Field("run", description="'reproduce' runs the method's paper-claim experiment")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    priority: int = Field(0, ge=0, le=9, description="higher runs first")
    max_attempts: int | None = Field(None, ge=1, le=20)
    _numbers = json_numbers("seed", "priority", "max_attempts")
    resources: Resources = Field(default_factory=Resources)
    tags: dict[str, str] = Field(default_factory=dict)
    resume_from: str | None = Field(
        None, max_length=26, description="a job id whose last checkpoint this job starts from"
    )

    @field_validator("tags")
    @classmethod
    def _few_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        if len(tags) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in tags.items()):
            raise ValueError("at most 32 tags, keys ≤ 64 and values ≤ 256 characters")
        return tags


class Progress(BaseModel):
    done: int
    total: int
    fraction: float | None
    message: str


class Failure(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    id: str
    method: str
    dataset: str | None
    mode: str
    params: dict[str, Any]
    status: str
    attempt: int
    max_attempts: int
    priority: int
    seed: int
    resources: dict[str, Any]
    tags: dict[str, Any]
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    failure: Failure | None
    result: dict[str, Any] | None
    parent_id: str | None
    links: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> JobOut:
        base = f"/api/v1/jobs/{job.id}"
        total = job.progress_total or 0
        return cls(
            id=job.id,
            method=job.method,
            dataset=job.dataset,
            mode=job.mode,
            params=job.params or {},
            status=job.status,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            priority=job.priority,
            seed=job.seed,
            resources=job.resources or {},
            tags=job.tags or {},
            progress=Progress(
                done=job.progress_done,
                total=total,
                message=job.progress_message or "",
                fraction=(job.progress_done / total) if total else None,
            ),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            failure=Failure(code=job.failure_code, message=job.error) if (job.error or job.failure_code) else None,
            result=job.result,
            parent_id=job.parent_id,
            links={
                "self": base,
                "metrics": f"{base}/metrics",
                "logs": f"{base}/logs",
                "artifacts": f"{base}/artifacts",
                "cancel": f"{base}/cancel",
            },
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class MetricPointOut(BaseModel):
    name: str
    step: int
    value: float
    time: float


class MetricsOut(BaseModel):
    items: list[MetricPointOut]
    names: list[str]
    downsampled: bool


class LogsOut(BaseModel):
    offset: int
    next_offset: int
    text: str
    eof: bool = Field(description="true once the job is finished and every byte was returned")


class ArtifactOut(BaseModel):
    name: str
    kind: str
    size: int
    sha256: str
    content_type: str
    step: int | None
    created_at: datetime
    url: str

    @classmethod
    def of(cls, a: Artifact) -> ArtifactOut:
        return cls(
            name=a.name,
            kind=a.kind,
            size=a.size,
            sha256=a.sha256,
            content_type=a.content_type,
            step=a.step,
            created_at=a.created_at,
            url=f"/api/v1/jobs/{a.job_id}/artifacts/{a.name}",
        )


class ArtifactPage(BaseModel):
    items: list[ArtifactOut]


class ModelOut(BaseModel):
    name: str
    version: int
    ref: str
    source_job_id: str | None
    config: dict[str, Any]
    files: dict[str, Any]
    created_at: datetime
    notes: list[str] = Field(default_factory=list, description="what the import left out, and why")

    @classmethod
    def of(cls, m: RegisteredModel) -> ModelOut:
        skipped = list((m.config or {}).get("skipped") or [])
        notes = (
            [
                f"left out {len(skipped)} file(s) unread: pickled weights and a hub's bookkeeping "
                f"({', '.join(skipped[:5])}{', …' if len(skipped) > 5 else ''}); the model loads from its safetensors"
            ]
            if skipped
            else []
        )
        return cls(
            name=m.name,
            version=m.version,
            ref=f"{m.name}@{m.version}",
            source_job_id=m.source_job_id,
            config=m.config or {},
            files=m.files or {},
            created_at=m.created_at,
            notes=notes,
        )


class CancelOut(BaseModel):
    id: str
    status: str


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["viewer", "member", "admin"] = "member"
    name: str = Field("", max_length=128, description="what the key is for, e.g. 'ci' or 'alice laptop'")


class KeyOut(BaseModel):
    id: str
    project: str
    role: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    key: str | None = Field(None, description="the secret; present only in the response that created the key")

    @classmethod
    def of(cls, k: ApiKey, secret: str | None = None) -> KeyOut:
        return cls(
            id=k.id,
            project=k.project,
            role=k.role,
            name=k.name,
            prefix=k.prefix,
            created_at=k.created_at,
            last_used_at=k.last_used_at,
            revoked_at=k.revoked_at,
            key=secret,
        )


# The largest integer a request may carry where the database stores it: 2**53 - 1 (9 PB, or 9e15 steps) is far
# beyond any disk or job, inside the database's 64-bit integers, and exact in every JSON parser (a float64 one
# too, so a client's schema validator and the server agree on the bound)
MAX_STORED_INT = 2**53 - 1
MAX_QUOTA_BYTES = MAX_STORED_INT


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        min_length=2,
        max_length=64,
        pattern=pattern_hint(
            r"^[a-z0-9][a-z0-9_-]{1,63}$", "use 2-64 lowercase letters, digits, '_' or '-', starting with one"
        ),
    )
    description: str = Field("", max_length=2000)
    max_active_jobs: int | None = Field(None, ge=1, le=100_000)
    max_stored_bytes: int | None = Field(None, ge=1024, le=MAX_QUOTA_BYTES)
    _numbers = json_numbers("max_active_jobs", "max_stored_bytes")


class ProjectQuotas(BaseModel):
    """An operator's change to a project's quotas (null: the server-wide default)."""

    model_config = ConfigDict(extra="forbid")

    max_active_jobs: int | None = Field(None, ge=1, le=100_000)
    max_stored_bytes: int | None = Field(None, ge=1024, le=MAX_QUOTA_BYTES)
    _numbers = json_numbers("max_active_jobs", "max_stored_bytes")


class ProjectOut(BaseModel):
    name: str
    description: str
    max_active_jobs: int | None
    max_stored_bytes: int | None
    created_at: datetime
    archived_at: datetime | None = Field(None, description="read-only since then (null: active)")
    admin_key: KeyOut | None = Field(None, description="the new project's first admin key (shown once)")


class AuditOut(BaseModel):
    id: int
    time: datetime
    key_id: str | None
    action: str
    target: str
    detail: dict[str, Any]
    request_id: str | None
    client: str | None

    @classmethod
    def of(cls, e: AuditEvent) -> AuditOut:
        return cls(
            id=e.id,
            time=e.time,
            key_id=e.key_id,
            action=e.action,
            target=e.target,
            detail=e.detail or {},
            request_id=e.request_id,
            client=e.client,
        )


MAX_BYTES = 2**53 - 1  # a byte count or offset: 8 PiB, the largest integer every JSON reader (float64) holds exactly


class UploadIn(BaseModel):
    """A file to send in parts (`PATCH /api/v1/uploads/{id}`), declared before its first byte."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(
        ..., min_length=1, max_length=255, description="the file's name (its suffix says .zip or .tar.gz)"
    )
    size: int = Field(..., ge=1, le=MAX_BYTES, description="the file's size in bytes")
    sha256: str | None = Field(
        None,
        pattern="^[0-9a-fA-F]{64}$",
        description="the file's SHA-256 (hex); when given, the assembled file is checked against it before use",
    )


class UploadOut(BaseModel):
    id: str
    filename: str
    size: int
    offset: int = Field(description="bytes received: the next part starts here")
    sha256: str | None
    part_bytes: int = Field(description="the largest part (one PATCH body) the server takes")
    created_at: datetime
    expires_at: datetime = Field(description="an unfinished upload is deleted then")
    complete: bool

    @classmethod
    def of(cls, row: Upload, part_bytes: int) -> UploadOut:
        kept = ("id", "filename", "size", "offset", "sha256", "created_at", "expires_at")
        return cls(**{f: getattr(row, f) for f in kept}, part_bytes=part_bytes, complete=row.offset == row.size)
