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
    raise ValueError(f"CRUCIBLE_EXECUTOR={settings.executor!r} is not available in this build; use 'local'")
