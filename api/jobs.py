"""Job business rules, as plain functions of a session: testable without HTTP, called by thin routes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.model_refs import check_model_params
from api.problems import Problem, field_problem, validation_problem
from api.schemas import JobCreate
from models.datasets import UnknownDatasetError
from models.registry import UnknownMethodError, get_method
from models.reproduction import get_reproduction
from workers import lifecycle
from workers.datasets import find_info
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import ACTIVE, DEFAULT_PROJECT, TERMINAL, Artifact, Job, LogChunk, Metric


def request_hash(spec: JobCreate) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def validate_spec(
    session: Session,
    spec: JobCreate,
    project: str = DEFAULT_PROJECT,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Check method, dataset kind and params (and, given settings and store, the models the params name);
    return the params with defaults filled in."""
    try:
        method = get_method(spec.method)
    except UnknownMethodError as exc:
        raise field_problem(
            "/method", f"{exc.args[0]}; list methods at /api/v1/methods", slug="unknown-method", title="Unknown method"
        ) from None
    if spec.mode == "reproduce":
        try:
            get_reproduction(method.id)
        except UnknownMethodError:
            raise field_problem("/mode", f"method {method.id} declares no reproduction; use mode 'run'") from None
        smoke = spec.params.get("smoke", False)
        if set(spec.params) - {"smoke"} or not isinstance(smoke, bool):
            raise field_problem("/params", 'a reproduction takes only {"smoke": true|false}')
        return {"smoke": smoke}
    if spec.dataset is None:
        if method.datasets:
            raise field_problem(
                "/dataset",
                f"method {method.id} needs a dataset of kind {' or '.join(method.datasets)}; see /api/v1/datasets",
                slug="missing-dataset",
            )
    else:
        try:
            info = find_info(session, spec.dataset, project)
        except UnknownDatasetError as exc:
            raise field_problem(
                "/dataset",
                f"no dataset named {spec.dataset!r}; known: {', '.join(exc.known)}",
                slug="unknown-dataset",
                title="Unknown dataset",
            ) from None
        if method.datasets and info.kind not in method.datasets:
            raise field_problem(
                "/dataset",
                f"dataset {info.name} is of kind {info.kind}, but {method.id} takes "
                f"{' or '.join(method.datasets)}; pick a dataset of that kind",
                slug="wrong-dataset-kind",
                title="Dataset of the wrong kind",
            )
    try:
        params = method.params.model_validate(spec.params)
    except ValidationError as exc:
        raise validation_problem(exc.errors(), prefix="/params") from None
    values = params.model_dump(mode="json")
    if settings is not None and store is not None:
        check_model_params(session, settings, store, method, values, project)
    return values


def executor_capacity(settings: Settings) -> dict[str, float]:
    """What one job can be given: CRUCIBLE_MAX_JOB_CPUS / _GPUS, by default this machine's cores and GPUs."""
    import os

    import torch

    cpus = settings.max_job_cpus if settings.max_job_cpus is not None else float(os.cpu_count() or 1)
    gpus = settings.max_job_gpus if settings.max_job_gpus is not None else float(torch.cuda.device_count())
    return {"cpus": cpus, "gpus": gpus}


def check_resources(settings: Settings, spec: JobCreate) -> None:
    """A job must not ask for more than an executor can give (it would queue forever, or run on less)."""
    capacity = executor_capacity(settings)
    for name, most in capacity.items():
        asked = getattr(spec.resources, name)
        if asked > most:
            raise field_problem(
                f"/resources/{name}",
                f"{asked:g} asked; an executor here gives a job at most {most:g} (CRUCIBLE_MAX_JOB_{name.upper()})",
                slug="resources-unavailable",
                title="More resources than an executor can give",
            )


def idempotency_token(project: str, key: str) -> str:
    """Keys are the client's names, unique per project: stored hashed with the project, so two projects
    may both use `run-1` and neither learns of the other's."""
    return hashlib.sha256(f"{project}\0{key}".encode()).hexdigest()


def submit(
    session: Session,
    settings: Settings,
    spec: JobCreate,
    idempotency_key: str | None,
    project: str = DEFAULT_PROJECT,
    store: ObjectStore | None = None,
) -> tuple[Job, bool]:
    """Queue a job; with an Idempotency-Key, a repeat of the same request returns the first job."""
    digest = request_hash(spec)
    token = None
    if idempotency_key:
        if len(idempotency_key) > 128:
            raise field_problem("/headers/Idempotency-Key", "at most 128 characters", status=400)
        token = idempotency_token(project, idempotency_key)
        existing = session.scalars(select(Job).where(Job.idempotency_key == token)).first()
        if existing is not None:
            return _replay(existing, digest), False
    params = validate_spec(session, spec, project, settings, store)
    if spec.resume_from:
        parent = session.get(Job, spec.resume_from)
        if parent is None or parent.project != project:
            raise field_problem("/resume_from", f"no job {spec.resume_from} to resume from")
    check_resources(settings, spec)
    check_job_quota(session, settings, project)
    job = Job(
        method=get_method(spec.method).id,
        dataset=spec.dataset,
        mode=spec.mode,
        params=params,
        resources=spec.resources.model_dump(exclude_none=True),
        tags=spec.tags,
        seed=spec.seed,
        priority=spec.priority,
        max_attempts=spec.max_attempts or settings.max_attempts,
        idempotency_key=token,
        request_hash=digest,
        parent_id=spec.resume_from,
        project=project,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the insert
        session.rollback()
        existing = session.scalars(select(Job).where(Job.idempotency_key == token)).first()
        if existing is None:
            raise
        return _replay(existing, digest), False
    return job, True


def check_job_quota(session: Session, settings: Settings, project: str) -> None:
    from api.auth import project_limits

    limit, _ = project_limits(session, settings, project)
    active = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.project == project, Job.status.in_(("queued", *ACTIVE)))
        )
        or 0
    )
    if active >= limit:
        raise Problem(
            429,
            "job-quota",
            "Too many active jobs",
            f"project {project} has {active} queued or running jobs, its limit; wait for some to "
            "finish or cancel them (CRUCIBLE_MAX_ACTIVE_JOBS_PER_PROJECT)",
            extra={"limit": limit},
        )


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_hash != digest:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused with a different request",
            f"key already names job {existing.id} with another body; use a new key for a new job",
            extra={"job_id": existing.id},
        )
    return existing


def get_job(session: Session, job_id: str, project: str = DEFAULT_PROJECT) -> Job:
    """The job if it is this project's; another project's job is as missing as a job that never was."""
    job = session.get(Job, job_id)
    if job is None or job.project != project:
        raise lifecycle.JobNotFound(job_id)
    return job


def list_jobs(
    session: Session,
    *,
    status: str | None,
    method: str | None,
    limit: int,
    cursor: str | None,
    dataset: str | None = None,
    mode: str | None = None,
    search: str | None = None,
    project: str = DEFAULT_PROJECT,
) -> tuple[list[Job], str | None]:
    q = select(Job).where(Job.project == project).order_by(Job.id.desc()).limit(limit + 1)
    if status:
        q = q.where(Job.status.in_(status.split(",")))
    if method:
        q = q.where(Job.method == method)
    if dataset:
        q = q.where(Job.dataset == dataset)
    if mode:
        q = q.where(Job.mode == mode)
    if search:  # a job id (or its tail, as the dashboard shows it), a method or a dataset
        like = f"%{search.strip()}%"
        q = q.where(or_(Job.id.ilike(like), Job.method.ilike(like), Job.dataset.ilike(like)))
    if cursor:
        q = q.where(Job.id < cursor)
    rows = list(session.scalars(q))
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def metric_points(
    session: Session,
    job_id: str,
    names: list[str] | None,
    max_points: int,
    since_step: int | None = None,
    project: str = DEFAULT_PROJECT,
) -> tuple[list[Metric], list[str], bool]:
    """Points of each series, downsampled to about max_points per series keeping each bucket's min and max.

    With since_step, only points at a later step: a poller fetches what is new since its last look.
    """
    get_job(session, job_id, project)
    q = select(Metric).where(Metric.job_id == job_id).order_by(Metric.name, Metric.step)
    if names:
        q = q.where(Metric.name.in_(names))
    if since_step is not None:
        q = q.where(Metric.step > since_step)
    series: dict[str, list[Metric]] = {}
    for m in session.scalars(q):
        series.setdefault(m.name, []).append(m)
    out, downsampled = [], False
    for points in series.values():
        if len(points) <= max_points:
            out.extend(points)
            continue
        downsampled = True
        per = max(1, (2 * len(points)) // max_points)
        for i in range(0, len(points), per):
            bucket = points[i : i + per]
            keep = {id(min(bucket, key=lambda p: p.value)), id(max(bucket, key=lambda p: p.value))}
            out.extend(p for p in bucket if id(p) in keep)
        if out[-1] is not points[-1]:
            out.append(points[-1])
    return out, sorted(series), downsampled


def read_log(
    session: Session, job_id: str, offset: int, limit: int, project: str = DEFAULT_PROJECT
) -> tuple[str, int, bool]:
    """Bytes [offset, offset+limit) of the job's log as text, the next offset, and whether that is the end."""
    job = get_job(session, job_id, project)
    chunks = session.scalars(
        select(LogChunk).where(LogChunk.job_id == job_id, LogChunk.offset < offset + limit).order_by(LogChunk.offset)
    ).all()
    data = bytearray()
    for c in chunks:
        raw = c.text.encode("utf-8")
        if c.offset + len(raw) <= offset:
            continue
        data += raw[max(0, offset - c.offset) :]
    data = data[:limit]
    text = bytes(data).decode("utf-8", errors="ignore")
    next_offset = offset + len(text.encode("utf-8"))
    return text, next_offset, job.status in TERMINAL and next_offset >= job.log_bytes


def cancel(session: Session, job_id: str, project: str = DEFAULT_PROJECT) -> str:
    get_job(session, job_id, project)
    return lifecycle.request_cancel(session, job_id)


def delete_job(session: Session, store: ObjectStore, job_id: str, project: str = DEFAULT_PROJECT) -> None:
    """Terminal jobs only (as Ray's DELETE): rows first, then the objects."""
    job = get_job(session, job_id, project)
    if job.status not in TERMINAL:
        raise lifecycle.JobStateConflict(job_id, job.status, "deleted (cancel it first)")
    for table in (Metric, LogChunk, Artifact):
        session.execute(delete(table).where(table.job_id == job_id))
    session.delete(job)
    session.flush()
    store.delete_prefix(f"jobs/{job_id}/")


def retry(session: Session, settings: Settings, job_id: str, project: str = DEFAULT_PROJECT) -> Job:
    """A new job with the same spec that starts from the old one's last checkpoint."""
    old = get_job(session, job_id, project)
    if old.status not in TERMINAL:
        raise lifecycle.JobStateConflict(job_id, old.status, "retried (wait for it to finish)")
    check_job_quota(session, settings, project)
    job = Job(
        method=old.method,
        dataset=old.dataset,
        mode=old.mode,
        params=old.params,
        resources=old.resources,
        tags=old.tags,
        seed=old.seed,
        priority=old.priority,
        max_attempts=old.max_attempts,
        parent_id=old.id,
        project=project,
    )
    session.add(job)
    session.flush()
    return job
