"""Typed FastAPI dependencies: settings → app state → request. No route reads the environment."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from workers.db import get_sessionmaker
from workers.settings import Settings
from workers.storage import ObjectStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_session(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def notify_executor(request: Request) -> None:
    executor = getattr(request.app.state, "executor", None)
    if executor is not None:
        executor.notify()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
