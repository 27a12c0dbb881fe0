"""Fault injection against the real servers: S3 down mid-write, Postgres restarted mid-run, a
storm of idempotent submissions. Each test prints its figures (jobs, faults, losses, duplicates)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import torch
from sqlalchemy import func, select

from tests.conftest import wait_for
from tests.integration.stack import SERVICES, Weed, completions, restart_postgres
from tests.integration.test_celery import assert_complete_series, server  # noqa: F401 (fixture)
from workers import lifecycle
from workers.context import JobRunContext
from workers.db import session_scope
from workers.settings import Settings
from workers.storage import S3Store
from workers.tables import Artifact, Job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TERMINAL = ("succeeded", "failed", "cancelled")


def figures(name: str, **values: object) -> None:
    print(f"\n[fault figures] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


# -- S3 ------------------------------------------------------------------------------------------
@pytest.fixture
def weed() -> Iterator[Weed]:
    w = Weed()
    yield w
    if not w.up():
        w.start()


def claimed_context(settings: Settings, store: S3Store) -> JobRunContext:
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter")
        s.add(job)
        s.flush()
        assert lifecycle.claim(s, job.id, 1, "test", 60) and lifecycle.mark_running(s, job.id, 1)
        s.expunge(job)
    return JobRunContext(job, None, settings, store, "cpu")


def checkpoint_rows(settings: Settings, job_id: str) -> list[Artifact]:
    with session_scope(settings.database_url) as s:
        return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")))


def test_a_multipart_checkpoint_write_survives_s3_being_down_for_seconds(stack_settings, s3_url, weed):
    bucket, _, prefix = s3_url[5:].partition("/")
    store = S3Store(bucket, prefix, SERVICES["CRUCIBLE_TEST_S3_ENDPOINT"])
    ctx = claimed_context(stack_settings, store)
    state = {"w": torch.arange(12 * 1024 * 1024, dtype=torch.float32)}  # 48 MiB: a multipart upload
    outage = threading.Thread(target=lambda: (time.sleep(0.3), weed.stop(), time.sleep(3), weed.start()))
    outage.start()
    started = time.monotonic()
    ctx.save_checkpoint(state, step=7)
    took = time.monotonic() - started
    outage.join()
    rows = checkpoint_rows(stack_settings, ctx.job_id)
    assert len(rows) == 1
    import hashlib

    assert hashlib.sha256(store.get_bytes(rows[0].key)).hexdigest() == rows[0].sha256
    loaded = ctx.load_checkpoint()
    assert loaded is not None and loaded.step == 7 and torch.equal(loaded.state["w"], state["w"])
    figures(
        "s3 outage during a checkpoint write",
        bytes=rows[0].size,
        outage_s=3,
        write_s=round(took, 1),
        registered=len(rows),
        corrupt=0,
    )


def test_a_failed_checkpoint_write_registers_nothing(stack_settings, s3_url, weed):
    bucket, _, prefix = s3_url[5:].partition("/")
    store = S3Store(bucket, prefix, SERVICES["CRUCIBLE_TEST_S3_ENDPOINT"], max_attempts=2, retry_s=2)
    ctx = claimed_context(stack_settings, store)
    ctx.save_checkpoint({"w": torch.ones(4)}, step=1)
    weed.stop()
    try:
        with pytest.raises(Exception):  # noqa: B017 - whichever error the client raises, the checkpoint is refused
            ctx.save_checkpoint({"w": torch.zeros(6 * 1024 * 1024)}, step=2)
    finally:
        weed.start()
    rows = checkpoint_rows(stack_settings, ctx.job_id)
    assert [r.step for r in rows] == [1]  # the failed write left no row behind
    assert not any("step-000000002" in k for k in store.list(f"jobs/{ctx.job_id}/"))
    assert ctx.load_checkpoint().step == 1


# -- Postgres ------------------------------------------------------------------------------------
def test_jobs_survive_a_postgres_restart(server, workers, stack_settings):  # noqa: F811
    workers("a", concurrency=2)
    ids = [
        server.submit(method="test-counter", params={"steps": 40, "step_seconds": 0.1, "checkpoint_every": 5})
        for _ in range(3)
    ]
    wait_for(lambda: sum(server.job(j)["status"] == "running" for j in ids) >= 2, timeout=90)
    time.sleep(1.5)
    down_s = restart_postgres()
    jobs = [server.wait_status(j, TERMINAL, timeout=180) for j in ids]
    lost = [j["id"] for j in jobs if j["status"] != "succeeded"]
    duplicates = sum(max(0, completions(stack_settings, j) - 1) for j in ids)
    figures(
        "postgres restart mid-run",
        jobs=len(ids),
        restarts=1,
        restart_s=round(down_s, 1),
        attempts=[j["attempt"] for j in jobs],
        lost=len(lost),
        duplicates=duplicates,
    )
    assert not lost, [j["failure"] for j in jobs]
    assert duplicates == 0
    for j in ids:
        assert_complete_series(server, j, 40)


# -- idempotent submission ------------------------------------------------------------------------
def test_200_submissions_from_8_clients_with_reused_keys_each_run_exactly_once(server, workers, stack_settings):  # noqa: F811
    workers("a", concurrency=2)
    keys = [f"key-{i}" for i in range(8)]
    accepted: Counter[str] = Counter()
    by_key: dict[str, set[str]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    from api.jobs import idempotency_token
    from tests.conftest import make_key

    # one member key per client, as eight people of one project would have (idempotency keys are
    # per project, so their reuse still collides; the per-key rate limit is not what is tested here)
    api_keys = [make_key(stack_settings, role="member") for _ in range(8)]

    def client(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {api_keys[n]}"}) as http:
            for _ in range(25):
                key = rng.choice(keys)
                body = {"method": "test-counter", "params": {"steps": 2}, "tags": {"key": key}}
                r = http.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
                with lock:
                    if r.status_code != 201:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    accepted[r.json()["id"]] += 1
                    by_key.setdefault(key, set()).add(r.json()["id"])

    started = time.monotonic()
    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    submit_s = time.monotonic() - started
    assert not errors, errors[:3]
    assert sum(accepted.values()) == 200
    assert all(len(ids) == 1 for ids in by_key.values())  # a reused key always names its first job
    jobs = [server.wait_status(j, TERMINAL, timeout=300) for j in accepted]
    runs = {j: completions(stack_settings, j) for j in accepted}
    with session_scope(stack_settings.database_url) as s:
        stored = [idempotency_token("default", k) for k in keys]  # kept hashed with the project
        total_rows = s.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key.in_(stored)))
    lost = [j["id"] for j in jobs if j["status"] != "succeeded"]
    duplicates = sum(max(0, n - 1) for n in runs.values())
    figures(
        "200 submissions, 8 clients, reused keys",
        submissions=200,
        jobs=len(accepted),
        rows=total_rows,
        submit_per_s=round(200 / submit_s, 1),
        lost=len(lost),
        duplicates=duplicates,
    )
    assert total_rows == len(accepted) == len(by_key)
    assert not lost and set(runs.values()) == {1}
    assert all(j["attempt"] == 1 for j in jobs)
