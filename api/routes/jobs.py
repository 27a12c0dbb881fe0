"""Jobs: submit, list, inspect, follow (metrics, logs, artifacts), cancel, retry, delete."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api import jobs as service
from api.auth import PrincipalDep, SubmitLimitDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep, notify_executor
from api.openapi import NOT_MODIFIED, errors
from api.problems import Problem, field_problem
from api.schemas import (
    MAX_STORED_INT,
    ArtifactOut,
    ArtifactPage,
    CancelOut,
    JobCreate,
    JobOut,
    JobPage,
    LogsOut,
    MetricPointOut,
    MetricsOut,
)
from models.context import ARTIFACT_KINDS, check_artifact_name
from workers.tables import STATUSES, Artifact

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
JOB_ID_RULE = r"^[0-9A-HJKMNP-TV-Z]{26}$"  # a ULID (workers.tables.new_id)
# what models.context.check_artifact_name accepts: up to 8 segments, each starting with a letter or digit
ARTIFACT_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._ @+=-]{0,127}"
ARTIFACT_NAME_RULE = rf"^{ARTIFACT_SEGMENT}(/{ARTIFACT_SEGMENT}){{0,7}}$"
STATUS_LIST_RULE = "^({0})(,({0}))*$".format("|".join(STATUSES))
MAX_INDEX = MAX_STORED_INT  # steps and log offsets


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def submit(
    spec: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    response: Response,
    who: SubmitLimitDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobOut:
    """Queue a job. Its params are checked against the method's schema, and every model they name is resolved
    and checked against what the method needs (a 422 naming `/params/<field>`)."""
    job, created = service.submit(session, settings, spec, idempotency_key, who.project, store)
    if created:
        audit(session, request, who, "job.submit", job.id, method=job.method, dataset=job.dataset, mode=job.mode)
    session.commit()
    if created:
        notify_executor(request)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    who: PrincipalDep,
    status_: Annotated[
        str | None,
        Query(
            alias="status",
            description=f"comma-separated statuses, of {', '.join(STATUSES)}",
            json_schema_extra={"pattern": STATUS_LIST_RULE},
        ),
    ] = None,
    method: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: Annotated[
        str | None,
        Query(description="`next_cursor` of the previous page (a job id)", json_schema_extra={"pattern": JOB_ID_RULE}),
    ] = None,
    dataset: str | None = None,
    mode: Annotated[str | None, Query(pattern="^(run|reproduce)$")] = None,
    q: Annotated[str | None, Query(max_length=64, description="search in id, method and dataset")] = None,
) -> JobPage:
    if status_ is not None and not re.fullmatch(STATUS_LIST_RULE, status_):
        unknown = [x for x in status_.split(",") if x not in STATUSES]
        raise field_problem(
            "/status", f"unknown status {(unknown or [status_])[0]!r}; use one or more of {', '.join(STATUSES)}"
        )
    if cursor is not None and not re.fullmatch(JOB_ID_RULE, cursor):
        raise field_problem("/cursor", "not a cursor: pass the `next_cursor` of the previous page as it came")
    rows, next_cursor = service.list_jobs(
        session,
        status=status_,
        method=method,
        limit=limit,
        cursor=cursor,
        dataset=dataset,
        mode=mode,
        search=q,
        project=who.project,
    )
    return JobPage(items=[JobOut.of(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_MODIFIED)
def get_job(
    job_id: str, session: SessionDep, who: PrincipalDep, request: Request, response: Response
) -> JobOut | Response:
    out = JobOut.of(service.get_job(session, job_id, who.project))
    etag = '"' + hashlib.sha1(out.model_dump_json().encode()).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return out


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=CancelOut, responses=errors(409))
def cancel(job_id: str, session: SessionDep, request: Request, who: PrincipalDep) -> CancelOut:
    new_status = service.cancel(session, job_id, who.project)
    audit(session, request, who, "job.cancel", job_id, status=new_status)
    session.commit()
    notify_executor(request)
    return CancelOut(id=job_id, status=new_status)


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED, response_model=JobOut, responses=errors(409))
def retry(job_id: str, session: SessionDep, settings: SettingsDep, request: Request, who: SubmitLimitDep) -> JobOut:
    job = service.retry(session, settings, job_id, who.project)
    audit(session, request, who, "job.retry", job.id, of=job_id)
    session.commit()
    notify_executor(request)
    return JobOut.of(job)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
def delete(job_id: str, session: SessionDep, store: StoreDep, request: Request, who: PrincipalDep) -> Response:
    service.delete_job(session, store, job_id, who.project)
    audit(session, request, who, "job.delete", job_id)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def metrics(
    job_id: str,
    session: SessionDep,
    who: PrincipalDep,
    name: Annotated[list[str] | None, Query()] = None,
    max_points: int = Query(2000, ge=10, le=100_000),
    since_step: Annotated[int | None, Query(ge=-1, le=MAX_INDEX, description="only points at a later step")] = None,
) -> MetricsOut:
    points, names, downsampled = service.metric_points(session, job_id, name, max_points, since_step, who.project)
    return MetricsOut(
        items=[MetricPointOut(name=p.name, step=p.step, value=p.value, time=p.time) for p in points],
        names=names,
        downsampled=downsampled,
    )


@router.get("/{job_id}/logs", response_model=LogsOut)
def logs(
    job_id: str,
    session: SessionDep,
    who: PrincipalDep,
    offset: int = Query(0, ge=0, le=MAX_INDEX),
    limit: int = Query(64 * 1024, ge=1, le=4 * 1024 * 1024),
) -> LogsOut:
    text, next_offset, eof = service.read_log(session, job_id, offset, limit, who.project)
    return LogsOut(offset=offset, next_offset=next_offset, text=text, eof=eof)


@router.get("/{job_id}/artifacts", response_model=ArtifactPage)
def artifacts(
    job_id: str,
    session: SessionDep,
    who: PrincipalDep,
    kind: Literal[ARTIFACT_KINDS] | None = None,  # type: ignore[valid-type]
    prefix: str | None = None,
) -> ArtifactPage:
    service.get_job(session, job_id, who.project)
    q = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    if kind:
        q = q.where(Artifact.kind == kind)
    if prefix:
        q = q.where(Artifact.name.startswith(prefix, autoescape=True))
    return ArtifactPage(items=[ArtifactOut.of(a) for a in session.scalars(q)])


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=Response,
    responses={
        200: {"description": "the artifact's bytes, of its content type", "content": {"*/*": {}}},
        **NOT_MODIFIED,
        **errors(400),
    },
)
def download(
    job_id: str,
    name: Annotated[
        str,  # documented with its pattern, checked by check_artifact_name (a 400 naming the rule)
        Path(
            description="the artifact's name, e.g. plots/curve.png", json_schema_extra={"pattern": ARTIFACT_NAME_RULE}
        ),
    ],
    session: SessionDep,
    store: StoreDep,
    request: Request,
    who: PrincipalDep,
) -> Response:
    name = check_artifact_name(name)
    service.get_job(session, job_id, who.project)
    row = session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).first()
    if row is None:
        raise Problem(
            404,
            "artifact-not-found",
            "No such artifact",
            f"job {job_id} has no artifact {name!r}; list them at /api/v1/jobs/{job_id}/artifacts",
        )
    etag = f'"{row.sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    inline = row.content_type.startswith(("image/", "text/", "application/json"))
    filename = name.rsplit("/", 1)[-1]
    headers = {
        "ETag": etag,
        "Content-Length": str(row.size),
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{filename}"',
    }
    return StreamingResponse(store.iter_chunks(row.key), media_type=row.content_type, headers=headers)
