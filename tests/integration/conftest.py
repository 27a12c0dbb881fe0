"""Fixtures for the integration suite: the real servers that scripts/setup/services.sh started.

The setup script writes .crucible-test/services.env. A part it could not start is named there with
the reason; tests that need it skip with that reason, except under CI=true, where a missing server
fails the run (CI is root and must exercise the real stack).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

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


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test (dropped afterwards)."""
    require("postgres")
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(SERVICES["CRUCIBLE_TEST_PG_ADMIN_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} OWNER crucible"))
    url = SERVICES["CRUCIBLE_TEST_DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
    yield url
    from workers.db import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def redis_url() -> str:
    """Redis database 1, emptied for this test."""
    require("redis")
    import redis

    url = SERVICES["CRUCIBLE_TEST_REDIS_URL"] + "/1"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def s3_url() -> str:
    """s3://bucket/<unique prefix> on the SeaweedFS server."""
    require("s3")
    return f"s3://{SERVICES['CRUCIBLE_TEST_S3_BUCKET']}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stack_settings(tmp_path: Path, pg_url: str, redis_url: str, s3_url: str) -> Settings:
    """Settings for the full stack: Postgres state, Redis broker, S3 objects, migrated."""
    from workers.db import upgrade

    s = make_settings(tmp_path / "home", database_url=pg_url, redis_url=redis_url, storage_url=s3_url,
                      s3_endpoint=SERVICES["CRUCIBLE_TEST_S3_ENDPOINT"])
    upgrade(s.database_url)
    load_plugins(s)
    return s


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The environment a worker or server process of these settings runs with."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env
