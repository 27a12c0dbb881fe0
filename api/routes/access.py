"""Who may do what: the caller's identity, projects, API keys and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from sqlalchemy import func, select

from api import auth
from api.auth import AdminDep, OperatorDep, PrincipalDep, audit
from api.deps import SessionDep, SettingsDep
from api.openapi import errors
from api.problems import Problem
from api.schemas import MAX_STORED_INT, AuditOut, KeyCreate, KeyOut, ProjectCreate, ProjectOut, ProjectQuotas
from workers.tables import OPERATOR, TERMINAL, ApiKey, AuditEvent, Deployment, Job, Project, utcnow

router = APIRouter(prefix="/api/v1", tags=["access"])


@router.get("/whoami")
def whoami(who: PrincipalDep, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    jobs, stored = auth.project_limits(session, settings, who.project)
    return {
        "key_id": who.key_id,
        "key_name": who.key_name,
        "project": who.project,
        "role": who.role,
        "limits": {
            "max_active_jobs": jobs,
            "max_stored_bytes": stored,
            "stored_bytes": auth.stored_bytes(session, who.project),
            "submissions_per_minute": settings.rate_limit_submit_per_minute,
            "inference_requests_per_minute": settings.rate_limit_inference_per_minute,
            "project_submissions_per_minute": settings.rate_limit_submit_per_minute_per_project,
            "project_inference_requests_per_minute": settings.rate_limit_inference_per_minute_per_project,
            "max_deployments": settings.max_deployments_per_project,
        },
    }


@router.post("/projects", status_code=status.HTTP_201_CREATED, response_model=ProjectOut, responses=errors(409))
def create_project(body: ProjectCreate, session: SessionDep, who: OperatorDep, request: Request) -> ProjectOut:
    """A new project and its first admin key (shown once). Only the server's operator creates projects
    and chooses their quotas; a project's admin manages its keys."""
    project = auth.create_project(session, body.name, body.description)
    project.max_active_jobs, project.max_stored_bytes = body.max_active_jobs, body.max_stored_bytes
    key, secret = auth.create_key(
        session, project.name, "admin", name=f"first admin of {project.name}", created_by=who.key_id
    )
    audit(
        session,
        request,
        who,
        "project.create",
        project.name,
        max_active_jobs=body.max_active_jobs,
        max_stored_bytes=body.max_stored_bytes,
    )
    session.flush()  # the row's defaults (created_at) filled in
    return project_out(project).model_copy(update={"admin_key": KeyOut.of(key, secret)})


@router.get("/projects/current", response_model=ProjectOut)
def current_project(session: SessionDep, who: PrincipalDep) -> ProjectOut:
    p = session.get(Project, who.project)
    assert p is not None  # a key's project cannot be deleted while the key exists (foreign key)
    return project_out(p)


@router.patch("/projects/{name}", response_model=ProjectOut)
def set_quotas(name: str, body: ProjectQuotas, session: SessionDep, who: OperatorDep, request: Request) -> ProjectOut:
    """Set a project's quotas (operator only); a field left out keeps its value, null means the default."""
    p = _operated_project(session, name)
    for field in body.model_fields_set:
        setattr(p, field, getattr(body, field))
    audit(session, request, who, "project.quotas", name, **body.model_dump(exclude_unset=True))
    return project_out(p)


def project_out(p: Project) -> ProjectOut:
    return ProjectOut(
        name=p.name,
        description=p.description,
        max_active_jobs=p.max_active_jobs,
        max_stored_bytes=p.max_stored_bytes,
        created_at=p.created_at,
        archived_at=p.archived_at,
    )


def _operated_project(session: SessionDep, name: str) -> Project:
    p = session.get(Project, name)
    if p is None:
        raise Problem(404, "project-not-found", "No such project", f"no project named {name!r}")
    return p


@router.post("/projects/{name}/archive", response_model=ProjectOut, responses=errors(409))
def archive_project(name: str, session: SessionDep, who: OperatorDep, request: Request) -> ProjectOut:
    """Make a project read-only (operator only): its keys still read its jobs, metrics, artifacts and models,
    every write is a 409. Refused while it has queued or running jobs or deployments (cancel or delete them
    first), and for the operator's own project."""
    p = _operated_project(session, name)
    if name == who.project:
        raise Problem(409, "project-in-use", "Cannot archive this project", "the operator's own project stays open")
    unfinished = Job.status.not_in(TERMINAL)
    active = session.scalar(select(func.count()).select_from(Job).where(Job.project == name, unfinished))
    served = session.scalars(select(Deployment.name).where(Deployment.project == name)).all()
    if active or served:
        held = [f"{active} queued or running job(s)"] * bool(active) + [f"deployment(s) {', '.join(served)}"] * bool(
            served
        )
        raise Problem(
            409,
            "project-in-use",
            "The project is in use",
            f"project {name} has {' and '.join(held)}; cancel or delete them first",
        )
    if p.archived_at is None:
        p.archived_at = utcnow()
        audit(session, request, who, "project.archive", name)
    return project_out(p)


@router.post("/projects/{name}/restore", response_model=ProjectOut)
def restore_project(name: str, session: SessionDep, who: OperatorDep, request: Request) -> ProjectOut:
    """Open an archived project for writes again (operator only)."""
    p = _operated_project(session, name)
    if p.archived_at is not None:
        p.archived_at = None
        audit(session, request, who, "project.restore", name)
    return project_out(p)


@router.get("/keys")
def list_keys(session: SessionDep, who: AdminDep) -> dict[str, list[KeyOut]]:
    rows = session.scalars(select(ApiKey).where(ApiKey.project == who.project).order_by(ApiKey.created_at))
    return {"items": [KeyOut.of(k) for k in rows]}


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyOut)
def create_key(body: KeyCreate, session: SessionDep, who: AdminDep, request: Request) -> KeyOut:
    """A key of the caller's project; the response is the only time its secret is shown."""
    key, secret = auth.create_key(session, who.project, body.role, body.name, created_by=who.key_id)
    audit(session, request, who, "key.create", key.id, role=key.role, name=key.name)
    return KeyOut.of(key, secret)


@router.delete("/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: str, session: SessionDep, who: AdminDep, request: Request) -> KeyOut:
    target = session.get(ApiKey, key_id)
    if target is not None and target.project == who.project and target.role == OPERATOR and not who.can(OPERATOR):
        raise Problem(
            403,
            "forbidden",
            "Operator role required",
            "the operator's key can be revoked only by the operator (or replaced by `crucible up` after "
            "deleting $CRUCIBLE_HOME/admin-key)",
        )
    key = auth.revoke_key(session, who.project, key_id)
    audit(session, request, who, "key.revoke", key.id)
    return KeyOut.of(key)


@router.get("/audit")
def audit_log(
    session: SessionDep,
    who: AdminDep,
    limit: int = Query(100, ge=1, le=1000),
    before: Annotated[
        int | None, Query(ge=0, le=MAX_STORED_INT, description="events older than this id (paging)")
    ] = None,
    action: str | None = None,
) -> dict[str, Any]:
    q = select(AuditEvent).where(AuditEvent.project == who.project).order_by(AuditEvent.id.desc()).limit(limit)
    if before is not None:
        q = q.where(AuditEvent.id < before)
    if action:
        q = q.where(AuditEvent.action == action)
    rows = list(session.scalars(q))
    return {"items": [AuditOut.of(e) for e in rows], "next_before": rows[-1].id if len(rows) == limit else None}
