"""The Ray executor on a local Ray (token auth on, as Ray 2.60 defaults) with Postgres and SeaweedFS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api.jobs import submit
from api.schemas import JobCreate
from tests.conftest import wait_for
from tests.integration.stack import job_processes
from workers import lifecycle
from workers.db import session_scope
from workers.settings import Settings
from workers.tables import Job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def ray_executor(stack_settings: Settings) -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from workers.executors.ray import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    executor = RayExecutor(stack_settings.model_copy(update={"executor": "ray"}))
    executor.start()
    yield executor
    executor.stop()
    ray.shutdown()


def queue(settings: Settings, **params: Any) -> str:
    with session_scope(settings.database_url) as s:
        job, _ = submit(s, settings, JobCreate(method="test-counter", params=params, resources={"cpus": 1}), None)
        return job.id


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id)


def test_a_job_runs_as_a_ray_task_and_cancel_stops_another(ray_executor, stack_settings):
    import ray

    assert ray.is_initialized()
    done = queue(stack_settings, steps=10, checkpoint_every=5)
    long = queue(stack_settings, steps=10_000, step_seconds=0.05, ignore_cancel=True)
    job = wait_for(lambda: (j := job_row(stack_settings, done)).status in TERMINAL and j, timeout=120)
    assert job.status == "succeeded", job.error
    assert job.result["metrics"]["value"] == 55.0
    wait_for(lambda: job_row(stack_settings, long).status == "running", timeout=120)
    assert (job_row(stack_settings, long).lease_owner or "").startswith("ray:")
    with session_scope(stack_settings.database_url) as s:
        assert lifecycle.request_cancel(s, long) == "cancelling"
    # it ignores the flag: SIGTERM, then SIGKILL after the grace period, and the worker slot is free
    assert wait_for(lambda: job_row(stack_settings, long).status in TERMINAL, timeout=60)
    assert job_row(stack_settings, long).status == "cancelled"
    assert wait_for(lambda: not job_processes(long), timeout=20)
    wait_for(lambda: not ray_executor.refs, timeout=30)
