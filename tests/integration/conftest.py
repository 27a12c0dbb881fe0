"""Fixtures for the integration suite: the real servers that scripts/setup/services.sh started.

The setup script writes .crucible-test/services.env. A part it could not start is named there with
the reason; tests that need it skip with that reason, except under CI=true, where a missing server
fails the run (CI is root and must exercise the real stack).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.stack import SERVICES, CeleryWorker, fresh_database, stack
from workers.settings import Settings


def require(*parts: str) -> None:
    """Skip (or, on CI, fail) unless every named part ('postgres', 'redis', 's3') is up."""
    missing = [m for m in SERVICES.get("CRUCIBLE_SERVICES_MISSING", "").split(";") if m]
    reasons = [m for m in missing if m.split(":", 1)[0] in (*parts, "all")]
    for mod, part in (("psycopg", "postgres"), ("redis", "redis"), ("celery", "redis"), ("boto3", "s3")):
        if part in parts:
            try:
                __import__(mod)
            except ImportError:
                reasons.append(f"{part}: python package {mod} not installed (pip install -e '.[prod]')")
    if reasons:
        message = "; ".join(reasons)
        if os.environ.get("CI") == "true":
            pytest.fail(f"integration services unavailable on CI: {message}")
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def _aws_credentials() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for key in saved:
        os.environ[key] = SERVICES.get(key, "crucible")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test."""
    require("postgres")
    with fresh_database() as url:
        yield url


@pytest.fixture
def s3_url() -> str:
    """s3://bucket/<unique prefix> on the SeaweedFS server."""
    require("s3")
    return f"s3://{SERVICES['CRUCIBLE_TEST_S3_BUCKET']}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings for the full stack, shared by a test module (its tests each watch their own jobs):
    a migrated Postgres database, Redis database 1 (emptied), an S3 prefix of its own."""
    require("postgres", "redis", "s3")
    with stack(tmp_path_factory.mktemp("stack") / "home") as s:
        yield s


@pytest.fixture
def workers(stack_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    """Start Celery workers on the stack; all are stopped at the end of the test."""
    started: list[CeleryWorker] = []

    def start(name: str, concurrency: int = 1) -> CeleryWorker:
        w = CeleryWorker(stack_settings, name, tmp_path, concurrency)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL if not w.alive() else signal.SIGTERM)
