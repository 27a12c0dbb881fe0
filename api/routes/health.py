"""Liveness/readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text

from api.auth import require_admin
from api.deps import SessionDep, SettingsDep
from workers.tables import STATUSES, Job

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


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"], dependencies=[Depends(require_admin)])
def prometheus(session: SessionDep) -> str:
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines = ["# HELP crucible_jobs Jobs by status.", "# TYPE crucible_jobs gauge"]
    lines += [f'crucible_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in STATUSES]
    return "\n".join(lines) + "\n"
