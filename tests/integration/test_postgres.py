"""The same models, migrations and compare-and-set transitions on a real Postgres 15 (psycopg 3)."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select

from workers import lifecycle
from workers.db import downgrade, get_engine, session_scope, upgrade
from workers.tables import Base, Job

pytestmark = pytest.mark.integration


def test_migrations_go_up_and_down_on_postgres(pg_url: str):
    upgrade(pg_url)
    engine = create_engine(pg_url)
    assert {"jobs", "metrics", "artifacts", "models", "datasets", "log_chunks"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree on Postgres; add a revision: {diff}"
    downgrade(pg_url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(pg_url)
    engine.dispose()


def test_metric_replay_upserts_on_postgres(pg_url: str):
    from workers.context import upsert_metrics

    upgrade(pg_url)
    with session_scope(pg_url) as s:
        s.add(Job(id="J" * 26, method="test-counter"))
    rows = [
        {"job_id": "J" * 26, "name": "loss", "step": i, "value": float(i), "time": 0.0, "attempt": 1}
        for i in range(100)
    ]
    with session_scope(pg_url) as s:
        upsert_metrics(s, rows)
    with session_scope(pg_url) as s:  # a replayed flush (e.g. after a lost commit acknowledgement)
        upsert_metrics(s, [dict(r, value=-1.0, attempt=2) for r in rows])
    from workers.tables import Metric

    with session_scope(pg_url) as s:
        values = s.scalars(select(Metric.value).where(Metric.job_id == "J" * 26)).all()
    assert len(values) == 100 and set(values) == {-1.0}


def test_workers_racing_for_the_same_jobs_claim_each_exactly_once(pg_url: str):
    upgrade(pg_url)
    jobs, racers = 60, 16
    with session_scope(pg_url) as s:
        ids = []
        for _ in range(jobs):
            job = Job(method="test-counter")
            s.add(job)
            s.flush()
            ids.append(job.id)
    get_engine(pg_url).dispose()
    claims: Counter[str] = Counter()
    lock, start = threading.Lock(), threading.Barrier(racers)

    def racer(n: int) -> None:
        order = ids[:]
        random.Random(n).shuffle(order)
        start.wait()
        for job_id in order:
            with session_scope(pg_url) as s:
                won = lifecycle.claim(s, job_id, 1, f"racer-{n}", 30)
            if won:
                with session_scope(pg_url) as s:
                    assert lifecycle.mark_running(s, job_id, 1)
                    assert lifecycle.finish(s, job_id, 1, "succeeded")
                with lock:
                    claims[job_id] += 1

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == sorted(ids) and set(claims.values()) == {1}
    with session_scope(pg_url) as s:
        assert set(s.scalars(select(Job.status))) == {"succeeded"}
