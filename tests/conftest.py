"""Shared fixtures: a private state folder per test, migrated, with fast heartbeat/flush settings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tests.fixtures.methods  # noqa: E402,F401  (registers the fixture methods in this process)
from workers.db import upgrade
from workers.settings import Settings
from workers.storage import LocalStore

torch.set_num_threads(1)
FIXTURE_PLUGINS = "tests.fixtures.methods"


def make_settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=home,
        plugins=FIXTURE_PLUGINS,
        heartbeat_s=0.5,
        lease_s=6.0,
        cancel_grace_s=1.0,
        metric_flush_s=0.3,
        max_concurrent_jobs=2,
        demo_job=False,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = make_settings(tmp_path / "home")
    upgrade(s.database_url)
    from workers.settings import load_plugins

    load_plugins(s)
    return s


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(settings.home / "objects")


def make_key(settings: Settings, project: str = "default", role: str = "admin") -> str:
    """A fresh API key (creating the project if needed), as an admin would hand one out."""
    from api.auth import create_key
    from workers.db import session_scope
    from workers.tables import Project

    with session_scope(settings.database_url) as s:
        if s.get(Project, project) is None:
            s.add(Project(name=project))
            s.flush()
        _, secret = create_key(s, project, role, name=f"test {role}")
    return secret


@pytest.fixture
def api(settings: Settings) -> Iterator[Any]:
    """The API in-process without an executor (jobs stay queued unless a test runs them), as an admin
    of the default project."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings, run_executor=False)) as client:
        client.headers["Authorization"] = f"Bearer {make_key(settings)}"
        yield client


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll until predicate() is truthy; the timeout only bounds a hung test, it asserts no speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")
