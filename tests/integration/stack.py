"""The real stack as plain objects: the integration tests' fixtures and bench/chaos.py drive the same ones.

scripts/setup/services.sh starts Postgres, Redis and SeaweedFS and writes their addresses to a
services.env file; this module reads it and knows how to start the parts Crucible runs on them (the
API process, `crucible worker` processes) and how to break them (kill a worker or a job process,
restart Postgres, take the S3 gateway away). Nothing here imports pytest, so a bench can use it; every
function that touches a server takes the services it means, the suite's own by default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.e2e.test_server import Server
from workers.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# CRUCIBLE_TEST_SERVICES_ENV points the suite at another stack (one that services.sh started elsewhere)
ENV_FILE = Path(os.environ.get("CRUCIBLE_TEST_SERVICES_ENV") or REPO / ".crucible-test" / "services.env")
Services = Mapping[str, str]


def read_services(path: Path = ENV_FILE) -> dict[str, str]:
    """The servers' addresses that scripts/setup/services.sh wrote (and what it could not start)."""
    if not path.exists():
        return {"CRUCIBLE_SERVICES_MISSING": f"all: {path} not written (run scripts/setup/services.sh)"}
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


SERVICES = read_services()


@contextmanager
def fresh_database(services: Services = SERVICES) -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from workers.db import get_engine

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(services["CRUCIBLE_TEST_PG_ADMIN_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} OWNER crucible"))
    url = services["CRUCIBLE_TEST_DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        admin.dispose()  # a test may have restarted Postgres under the pooled connection
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@contextmanager
def stack(home: Path, services: Services = SERVICES, redis_db: int = 1, **overrides: Any) -> Iterator[Settings]:
    """Settings for the full stack: a migrated Postgres database of its own (dropped afterwards), Redis
    database `redis_db` (emptied), an S3 prefix of its own, the test plugins loaded; test timings
    (half-second heartbeats, 6 s leases) unless `overrides` say otherwise."""
    import redis

    from tests.conftest import make_settings
    from workers.db import upgrade
    from workers.settings import load_plugins

    redis_url = f"{services['CRUCIBLE_TEST_REDIS_URL']}/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    with fresh_database(services) as url:
        s = make_settings(
            home,
            database_url=url,
            redis_url=redis_url,
            storage_url=f"s3://{services['CRUCIBLE_TEST_S3_BUCKET']}/t-{uuid.uuid4().hex[:12]}",
            s3_endpoint=services["CRUCIBLE_TEST_S3_ENDPOINT"],
            **overrides,
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


# -- Crucible's processes -------------------------------------------------------------------------
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


def api_server(settings: Settings, home: Path, executor: str = "celery") -> Server:
    """The real API process (`crucible up`) with `executor` on the stack of `settings` (its database,
    broker, store and Ray address), started; its own home holds its admin key and log."""
    shared = ("DATABASE_URL", "REDIS_URL", "STORAGE_URL", "S3_ENDPOINT", "RAY_ADDRESS")
    env = {k: v for k, v in settings.to_env().items() if k.split("_", 1)[1] in shared}
    home.mkdir(parents=True, exist_ok=True)
    srv = Server(home, env={**env, "CRUCIBLE_EXECUTOR": executor})
    srv.start()
    return srv


STACK_HOMES: list[Path] = []  # every stack's state folder: its workers write job pid files under home/run


def job_processes(job_id: str) -> list[int]:
    """Live job processes of a job, from the pid files the Celery and Ray workers write (forked job
    processes carry the fork server's command line, so the pid file is the way to find them)."""
    from tests.e2e.test_server import job_processes as live_pid_in

    return [pid for home in STACK_HOMES for pid in live_pid_in(home, job_id)]


def parent_of(pid: int) -> int | None:
    """The parent process id (a job's fork server, the fork server's worker), or None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# -- breaking the servers -------------------------------------------------------------------------
class Weed:
    """SeaweedFS's S3 gateway that scripts/setup/services.sh started: stopped and restarted in place."""

    def __init__(self, services: Services = SERVICES) -> None:
        self.services = services
        self.pid_file = Path(services["CRUCIBLE_TEST_S3_PID_FILE"])
        self.argv = (self.pid_file.parent / "s3.argv").read_text().splitlines()
        self.pid = int(self.pid_file.read_text())
        self.proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        wait_for(lambda: not alive(self.pid), timeout=10, every=0.05)

    def start(self) -> None:
        from workers.storage import S3Store

        log = open(self.pid_file.parent / "s3.log", "ab")
        proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.pid, self.proc = proc.pid, proc
        self.pid_file.write_text(str(proc.pid))
        store = S3Store(
            self.services["CRUCIBLE_TEST_S3_BUCKET"],
            "probe",
            self.services["CRUCIBLE_TEST_S3_ENDPOINT"],
            max_attempts=1,
            retry_s=0,
        )
        wait_for(lambda: _answers(store), timeout=60, every=0.2)

    def up(self) -> bool:
        return alive(self.pid)


def _answers(store: Any) -> bool:
    try:
        store.put_bytes("up", b"ok")
        return True
    except Exception:
        return False


def restart_postgres(services: Services = SERVICES) -> float:
    """`pg_ctl restart -m fast` of the stack's Postgres (every connection dropped); returns its seconds."""
    pg_ctl = Path(services["CRUCIBLE_TEST_PG_BIN"]) / "pg_ctl"
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    started = time.monotonic()
    data = services["CRUCIBLE_TEST_PG_DATA"]
    # -l: the server must not inherit our pipes (we would wait for it to exit)
    subprocess.run(
        [*as_user, str(pg_ctl), "-D", data, "-l", f"{data}/server.log", "-m", "fast", "-w", "restart"],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    return time.monotonic() - started


# -- what the tests and the bench check -----------------------------------------------------------
def completions(settings: Settings, job_id: str) -> int:
    """How many times the job ran to its end (test-counter registers a model version each time)."""
    from sqlalchemy import func, select

    from workers.db import session_scope
    from workers.tables import RegisteredModel

    with session_scope(settings.database_url) as s:
        return s.scalar(
            select(func.count()).select_from(RegisteredModel).where(RegisteredModel.source_job_id == job_id)
        )


def series_problems(series: list[tuple[int, float]], steps: int) -> list[str]:
    """What is wrong with a finished test-counter's `value` series: a missing or repeated step, or a
    value that is not the running total (an attempt that resumed from the wrong state)."""
    problems = []
    got = [s for s, _ in series]
    if got != list(range(1, steps + 1)):
        problems.append(f"steps {got[:3]}…{got[-3:]} ({len(got)}), not 1…{steps}")
    wrong = [s for s, v in series if v != s * (s + 1) / 2]
    if wrong:
        problems.append(f"{len(wrong)} values off the running total, first at step {wrong[0]}")
    return problems
