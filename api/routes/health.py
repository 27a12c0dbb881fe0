"""Liveness/readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text

from api.auth import AdminDep
from api.deps import SessionDep, SettingsDep
from workers.tables import OPERATOR, STATUSES, Job

router = APIRouter()


@router.get("/api/v1/health", tags=["ops"])
def health(session: SessionDep, settings: SettingsDep, request: Request) -> dict[str, object]:
    session.execute(text("SELECT 1"))
    executor = getattr(request.app.state, "executor", None)
    return {
        "status": "ok",
        "version": request.app.version,
        "database": session.get_bind().dialect.name,
        "executor": settings.executor if executor is not None else "none",
        "storage": settings.storage_url.split("://", 1)[0],
    }


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
def prometheus(session: SessionDep, who: AdminDep) -> str:
    """Jobs by status: the whole server's for the operator, the caller's project's for a project admin."""
    q = select(Job.status, func.count()).group_by(Job.status)
    if not who.can(OPERATOR):
        q = q.where(Job.project == who.project)
    counts = dict(session.execute(q).all())
    lines = ["# HELP crucible_jobs Jobs by status.", "# TYPE crucible_jobs gauge"]
    lines += [f'crucible_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in STATUSES]
    return "\n".join(lines) + "\n"
