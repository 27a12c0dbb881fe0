"""Fixtures for the integration suite: the real servers that scripts/setup/services.sh started.

The setup script writes .crucible-test/services.env. A part it could not start is named there with
the reason; tests that need it skip with that reason, except under CI=true, where a missing server
fails the run (CI is root and must exercise the real stack).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from workers.settings import Settings, load_plugins

REPO = Path(__file__).resolve().parents[2]
ENV_FILE = REPO / ".crucible-test" / "services.env"


def read_services() -> dict[str, str]:
    if not ENV_FILE.exists():
        return {"CRUCIBLE_SERVICES_MISSING": f"all: {ENV_FILE} not written (run scripts/setup/services.sh)"}
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


SERVICES = read_services()


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


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from workers.db import get_engine

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(SERVICES["CRUCIBLE_TEST_PG_ADMIN_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} OWNER crucible"))
    url = SERVICES["CRUCIBLE_TEST_DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        admin.dispose()  # a test may have restarted Postgres under the pooled connection
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


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
    import redis

    from workers.db import upgrade

    redis_url = SERVICES["CRUCIBLE_TEST_REDIS_URL"] + "/1"
    redis.Redis.from_url(redis_url).flushdb()
    with fresh_database() as url:
        s = make_settings(
            tmp_path_factory.mktemp("stack") / "home",
            database_url=url,
            redis_url=redis_url,
            storage_url=f"s3://{SERVICES['CRUCIBLE_TEST_S3_BUCKET']}/t-{uuid.uuid4().hex[:12]}",
            s3_endpoint=SERVICES["CRUCIBLE_TEST_S3_ENDPOINT"],
        )
        upgrade(s.database_url)
        load_plugins(s)
        STACK_HOMES.append(s.home)
        yield s


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The environment a worker or server process of these settings runs with."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class CeleryWorker:
    """A real `crucible worker` process (its own process group, so a test can kill it whole)."""

    def __init__(self, settings: Settings, name: str, log_dir: Path, concurrency: int = 1):
        self.name = f"{name}@test"
        self.log = open(log_dir / f"worker-{name}.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "worker",
                "-Q",
                "cpu",
                "-c",
                str(concurrency),
                "-n",
                self.name,
                "--loglevel",
                "WARNING",
            ],
            cwd=REPO,
            env=settings_env(settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """As a crashed machine: SIGKILL to the worker (its pool children and job processes die with it)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


STACK_HOMES: list[Path] = []  # every stack's state folder: its workers write job pid files under home/run


def job_processes(job_id: str) -> list[int]:
    """Live job processes of a job, from the pid files the Celery and Ray workers write (forked job
    processes carry the fork server's command line, so the pid file is the way to find them)."""
    from tests.e2e.test_server import job_processes as live_pid_in

    return [pid for home in STACK_HOMES for pid in live_pid_in(home, job_id)]


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
