"""The model registry (read side; jobs register models through their RunContext)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import SessionDep
from api.problems import Problem
from api.schemas import ModelOut
from workers.tables import RegisteredModel

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("")
def models(session: SessionDep) -> dict[str, list[ModelOut]]:
    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.name, RegisteredModel.version.desc()))
    return {"items": [ModelOut.of(r) for r in rows]}


@router.get("/{name}")
def model_versions(session: SessionDep, name: str) -> dict[str, list[ModelOut]]:
    rows = list(session.scalars(select(RegisteredModel).where(RegisteredModel.name == name)
                                .order_by(RegisteredModel.version.desc())))
    if not rows:
        raise Problem(404, "model-not-found", "No such model", f"no registered model named {name!r}; see /api/v1/models")
    return {"items": [ModelOut.of(r) for r in rows]}
