"""Executors decide where `run_job` runs; the job row stays the truth whichever one is used."""

from __future__ import annotations

from typing import Protocol

from workers.settings import Settings


class Executor(Protocol):
    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def notify(self) -> None: ...


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "local":
        from workers.executors.local import LocalExecutor

        return LocalExecutor(settings)
    if settings.executor == "celery":
        from workers.executors.celery import CeleryExecutor

        return CeleryExecutor(settings)
    if settings.executor == "ray":
        from workers.executors.ray import RayExecutor

        return RayExecutor(settings)
    raise ValueError(f"CRUCIBLE_EXECUTOR={settings.executor!r}: use 'local', 'celery' or 'ray'")
