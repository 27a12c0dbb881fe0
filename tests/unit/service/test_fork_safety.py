"""What a forked job inherits from its fork server: the warm engine and S3 client, never the parent's
sockets. Two processes speaking over one Postgres connection interleave their protocol streams and
corrupt both sessions (the DuplicatePreparedStatement errors a fork after a query produces)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from workers import db, storage


def _in_child(check) -> int:  # type: ignore[no-untyped-def]
    """Run `check` in a forked child; its exit code says whether it held."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_forked_child_keeps_the_engine_but_not_the_parents_connections(tmp_path):
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    engine = db.get_engine(url)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert engine.pool.checkedin() == 1  # the parent's pooled connection

    def child_sees_a_fresh_pool() -> bool:
        if db.get_engine(url) is not engine or engine.pool.checkedin() != 0:
            return False
        with engine.connect() as conn:  # and opens its own
            return conn.execute(text("select 41 + 1")).scalar() == 42

    assert _in_child(child_sees_a_fresh_pool) == 0
    assert engine.pool.checkedin() == 1  # the parent's connection survived the child
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def test_a_forked_child_keeps_the_s3_client_and_closes_its_copies_of_the_sockets(monkeypatch):
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    client = storage.s3_client("http://127.0.0.1:9", "us-east-1")
    assert storage.s3_client("http://127.0.0.1:9", "us-east-1") is client  # one per endpoint and process
    closed: list[int] = []
    monkeypatch.setattr(type(client), "close", lambda self: closed.append(os.getpid()))

    def child_keeps_the_client_with_its_sockets_closed() -> bool:
        return storage.s3_client("http://127.0.0.1:9", "us-east-1") is client and closed == [os.getpid()]

    assert _in_child(child_keeps_the_client_with_its_sockets_closed) == 0
    assert closed == []  # the parent's pool is untouched
