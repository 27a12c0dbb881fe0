"""The Celery executor on real Redis, Postgres and SeaweedFS: `crucible up` dispatches, `crucible worker` runs."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from tests.conftest import wait_for
from tests.e2e.test_server import Server
from tests.integration.stack import api_server, completions, job_processes, series_problems
from workers.db import session_scope
from workers.settings import Settings
from workers.tables import Job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real API process with CRUCIBLE_EXECUTOR=celery on the same stack as the workers."""
    srv = api_server(stack_settings, tmp_path_factory.mktemp("api") / "home", executor="celery")
    yield srv
    srv.stop()


def owner_of(settings: Settings, job_id: str) -> str | None:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(Job.lease_owner).where(Job.id == job_id))


def assert_complete_series(server: Server, job_id: str, steps: int) -> None:
    assert not series_problems(server.metrics(job_id, "value"), steps)  # no gap, no duplicate step, right totals


def test_a_job_runs_on_a_celery_worker_with_state_in_postgres_and_objects_in_s3(server, workers, stack_settings):
    workers("w1")
    assert server.http.get("/api/v1/health").json()["executor"] == "celery"
    job_id = server.submit(method="test-counter", params={"steps": 12, "checkpoint_every": 4})
    job = server.wait_status(job_id, TERMINAL, timeout=90)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job["failure"]
    assert_complete_series(server, job_id, 12)
    result = server.http.get(f"/api/v1/jobs/{job_id}/artifacts/result.json").json()
    assert result == {"total": 78.0, "resumed_from": 0}
    ckpts = [
        a for a in server.http.get(f"/api/v1/jobs/{job_id}/artifacts").json()["items"] if a["kind"] == "checkpoint"
    ]
    assert ckpts and all(len(server.http.get(a["url"]).content) == a["size"] for a in ckpts)


def test_kill_9_of_a_worker_mid_job_resumes_on_a_new_worker_from_its_checkpoint(server, workers, stack_settings):
    first = workers("doomed")
    job_id = server.submit(method="test-counter", params={"steps": 50, "step_seconds": 0.1, "checkpoint_every": 10})
    wait_for(lambda: any(s >= 25 for s, _ in server.metrics(job_id, "value")), timeout=90)
    assert (owner_of(stack_settings, job_id) or "").startswith(f"celery:{first.name}:")
    first.kill9()
    assert wait_for(lambda: not job_processes(job_id), timeout=10)  # the job process died with its worker
    workers("rescuer")
    job = server.wait_status(job_id, TERMINAL, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job["failure"]
    result = server.http.get(f"/api/v1/jobs/{job_id}/artifacts/result.json").json()
    assert result["resumed_from"] >= 20 and result["total"] == 50 * 51 / 2
    assert_complete_series(server, job_id, 50)
    assert completions(stack_settings, job_id) == 1


def test_sigterm_requeues_running_jobs_and_they_resume_elsewhere(server, workers, stack_settings):
    first = workers("leaving")
    job_id = server.submit(method="test-counter", params={"steps": 40, "step_seconds": 0.1, "checkpoint_every": 5})
    wait_for(lambda: any(s >= 12 for s, _ in server.metrics(job_id, "value")), timeout=90)
    first.proc.send_signal(signal.SIGTERM)
    requeued = server.wait_status(job_id, ("queued",), timeout=15)
    assert requeued["attempt"] == 2 and requeued["failure"]["code"] == "preempted"
    first.proc.wait(timeout=30)  # warm shutdown ends once its job process stopped
    assert not job_processes(job_id)
    workers("next")
    job = server.wait_status(job_id, TERMINAL, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert server.http.get(f"/api/v1/jobs/{job_id}/artifacts/result.json").json()["resumed_from"] >= 10
    assert_complete_series(server, job_id, 40)


def test_cancel_stops_a_job_on_a_worker_and_frees_it(server, workers, stack_settings):
    workers("w1")
    polite = server.submit(method="test-counter", params={"steps": 10_000, "step_seconds": 0.05})
    server.wait_status(polite, ("running",), timeout=60)
    assert server.http.post(f"/api/v1/jobs/{polite}/cancel").json()["status"] == "cancelling"
    assert server.wait_status(polite, TERMINAL, timeout=30)["status"] == "cancelled"
    stubborn = server.submit(
        method="test-counter", params={"steps": 10_000, "step_seconds": 0.05, "ignore_cancel": True}
    )
    server.wait_status(stubborn, ("running",), timeout=60)  # the worker (concurrency 1) was freed
    server.http.post(f"/api/v1/jobs/{stubborn}/cancel")
    assert server.wait_status(stubborn, TERMINAL, timeout=60)["status"] == "cancelled"
    assert wait_for(lambda: not job_processes(stubborn), timeout=20)


def test_a_busy_worker_takes_the_higher_priority_job_next(server, workers, stack_settings):
    """Both jobs wait in the broker behind a running one; priority 8 starts before priority 1, though
    the priority-1 job was queued (and sent) first."""
    import time

    workers("solo")
    blocker = server.submit(method="test-counter", params={"steps": 80, "step_seconds": 0.1})
    server.wait_status(blocker, ("running",), timeout=90)
    low = server.submit(method="test-counter", params={"steps": 2}, priority=1)
    time.sleep(1.5)  # order, not speed: let the dispatcher send the low-priority job to the broker first
    high = server.submit(method="test-counter", params={"steps": 2}, priority=8)
    assert server.job(blocker)["status"] == "running", "the blocker ended before both jobs were waiting"
    for job_id in (blocker, low, high):
        assert server.wait_status(job_id, TERMINAL, timeout=180)["status"] == "succeeded"
    with session_scope(stack_settings.database_url) as s:
        started = {j: s.get(Job, j).started_at for j in (low, high)}
    assert started[high] < started[low]
