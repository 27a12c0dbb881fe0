"""Engine and sessions for SQLite (embedded) and Postgres, and the migration entry point."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the API read while job processes write; busy_timeout makes writers queue, not fail.
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def _ensure_sqlite_folder(url: str) -> None:
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def _private_sqlite_files(url: str) -> None:
    """The database, its WAL and shared-memory files: owner read/write only (SQLite creates the WAL and
    shm files with the database file's mode, so fixing the main file early covers them as well)."""
    path = _sqlite_file(url)
    if path is None:
        return
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists():
            os.chmod(p, 0o600)


def secure_state(home: Path, url: str) -> None:
    """The state folder (database, objects, logs, model caches) readable by this user only: 0700 folders,
    0600 database files. Jobs, datasets and keys' audit trails of every project live there."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    for sub in ("cache", "logs"):
        (home / sub).mkdir(exist_ok=True, mode=0o700)
        os.chmod(home / sub, 0o700)
    _private_sqlite_files(url)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One engine (one pool) per database URL and process."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create_engine(url)
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _forget_parent_connections() -> None:
    """A forked child must never talk over its parent's sockets (two processes interleaving one
    Postgres protocol stream corrupt both sessions), so it drops the inherited pool without closing
    the parent's connections; SQLAlchemy's documented pattern for multiprocessing. The engine itself,
    its initialised dialect and its compiled-statement cache, stay: that is what a warm fork inherits."""
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def _reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the server opens within the timeout (psycopg's own connect has
    none by default, and a fork server stuck connecting would stall every job). SQLite is local."""
    import socket

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" or not parsed.host:
        return True
    try:
        socket.create_connection((parsed.host, parsed.port or 5432), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def warm_engine(url: str) -> None:
    """Connect once and run the reads every job makes, then close every connection: the first
    connection initialises the dialect (several server round trips) and the reads fill the
    compiled-statement cache, so processes forked afterwards start with both (workers.preload). A SQLite
    file that does not exist yet is left alone (connecting would create it, unmigrated)."""
    from workers.tables import Artifact, Job

    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        return
    if not _reachable(url):
        parsed = make_url(url)
        raise ConnectionError(f"no database server answers at {parsed.host}:{parsed.port}")
    engine = get_engine(url)
    try:
        with session_scope(url) as s:
            s.get(Job, "")
            s.get(Artifact, 0)
    finally:
        engine.dispose()


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(list(migrations.__path__)[0])))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    _ensure_sqlite_folder(url)
    command.upgrade(alembic_config(url), revision)
    _private_sqlite_files(url)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
