"""Dispatch benchmark: Crucible's Celery and Ray executors against a bare Celery task and a bare Ray
task doing the same work (about one second), all measured in this one run on this machine.

    bash scripts/setup/services.sh && .venv/bin/python bench/dispatch.py [--jobs 3] [--submissions 200]

Needs the servers that scripts/setup/services.sh starts (Postgres, Redis, SeaweedFS).

1. End-to-end time of a ~1 s job, submitted to finished, median of --jobs rounds after two
   discarded warm-ups, the variants interleaved round by round: Crucible (`test-sleep`, 10 steps of
   0.1 s each logging a metric and progress, through the dispatcher, the broker or cluster, a claim,
   a forked job process and its fenced writes) against a bare `time.sleep(1)` task sent to a Celery
   worker on the same Redis, and a bare Ray task. For context, also `test-counter` (the same sleep
   plus two checkpoints, a result artifact and a registered model, all in S3), which does more than
   the bare task.
2. Submissions/s through `POST /api/v1/jobs` of one API process (in-process ASGI client, Postgres).

Ratios are Crucible ÷ bare; the issue's goals are < 1.2 for a 1 s job and ≥ 20 submissions/s.
Results go to bench/results/dispatch.json. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.stack import SERVICES  # noqa: E402  (the servers' addresses)

WORK_S = 1.0
CELERY_BARE_TASK = "bench.sleep"


def bare_celery_app(broker: str):  # type: ignore[no-untyped-def]
    from celery import Celery

    app = Celery("bench", broker=broker, backend=broker.rsplit("/", 1)[0] + "/3", set_as_current=False)
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, worker_hijack_root_logger=False)

    @app.task(name=CELERY_BARE_TASK)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    return app


WARM_UPS = 2  # Ray may start a second worker (and its job fork server) for the second task


def interleaved(variants: dict[str, Callable[[], None]], n: int) -> dict[str, float]:
    """Median seconds of each variant over `n` rounds, one run of every variant per round, after
    WARM_UPS discarded rounds (worker start, imports, first connections). Interleaving spreads the
    load of whatever else the machine runs over all variants alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(WARM_UPS + n):
        for name, run_one in variants.items():
            t = time.perf_counter()
            run_one()
            if round_ >= WARM_UPS:
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in samples.items()}


def make_settings(tmp: Path, executor: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, text

    from tests.conftest import make_settings as base
    from workers.db import upgrade

    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(SERVICES["CRUCIBLE_TEST_PG_ADMIN_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} OWNER crucible"))
    url = SERVICES["CRUCIBLE_TEST_DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
    settings = base(
        tmp / executor,
        database_url=url,
        executor=executor,
        redis_url=SERVICES["CRUCIBLE_TEST_REDIS_URL"] + "/4",
        storage_url=f"s3://{SERVICES['CRUCIBLE_TEST_S3_BUCKET']}/bench-{name}",
        s3_endpoint=SERVICES["CRUCIBLE_TEST_S3_ENDPOINT"],
        heartbeat_s=1.0,
        lease_s=30.0,
        # throughput is measured here, not the per-key abuse limits
        rate_limit_submit_per_minute=10**8,
        max_active_jobs_per_project=10**8,
    )
    upgrade(url)
    return settings


def crucible_job(settings: Any, executor: Any, method: str, params: dict[str, Any]) -> Callable[[], None]:
    """Submit as `POST /api/v1/jobs` does (the row, then a nudge to the executor's dispatcher) and wait
    for the job to finish."""
    from api.jobs import submit
    from api.schemas import JobCreate
    from workers.db import session_scope
    from workers.tables import Job

    def run_one() -> None:
        with session_scope(settings.database_url) as s:
            job, _ = submit(s, settings, JobCreate(method=method, params=params), None)
            job_id = job.id
        executor.notify()
        run_one.job_ids.append(job_id)  # type: ignore[attr-defined]
        while True:
            with session_scope(settings.database_url) as s:
                status = s.get(Job, job_id).status
            if status in ("succeeded", "failed", "cancelled"):
                assert status == "succeeded", status
                return
            time.sleep(0.01)

    run_one.job_ids = []  # type: ignore[attr-defined]
    return run_one


SLEEP_JOB = ("test-sleep", {"steps": 10, "step_seconds": WORK_S / 10})
COUNTER_JOB = ("test-counter", {"steps": 10, "step_seconds": WORK_S / 10})


def measure(settings: Any, executor: Any, n: int, bare: Callable[[], None]) -> dict[str, Any]:
    """The bare task, the like-for-like Crucible job (the same sleep plus a metric and progress per
    step) and, for context, the counter job that also writes two checkpoints, a result artifact and
    a registered model to S3, interleaved."""
    jobs = {
        "crucible": crucible_job(settings, executor, *SLEEP_JOB),
        "with_checkpoints": crucible_job(settings, executor, *COUNTER_JOB),
    }
    took = interleaved({"bare": bare, **jobs}, n)
    rows = {
        key: {"s": took[key], "ratio": took[key] / took["bare"], **phases(settings, job.job_ids[WARM_UPS:])}  # type: ignore[attr-defined]
        for key, job in jobs.items()
    }
    return {"bare_s": took["bare"], "crucible_s": took["crucible"], "ratio": rows["crucible"]["ratio"], **rows}


def phases(settings: Any, job_ids: list[str]) -> dict[str, float]:
    """Where a job's time goes (medians over the timed jobs): queued → claimed (dispatch, broker or
    cluster, claim) and claimed → finished (fork, the job's own work, checkpoint, artifact, settle)."""
    from workers.db import session_scope
    from workers.tables import Job

    with session_scope(settings.database_url) as s:
        rows = [s.get(Job, i) for i in job_ids]
        return {
            "queued_to_claimed_s": statistics.median((r.started_at - r.created_at).total_seconds() for r in rows),
            "claimed_to_finished_s": statistics.median((r.finished_at - r.started_at).total_seconds() for r in rows),
        }


def bench_celery(tmp: Path, n: int) -> dict[str, float]:
    import redis

    from tests.integration.stack import CeleryWorker
    from workers.executors.celery import CeleryExecutor
    from workers.settings import load_plugins

    settings = make_settings(tmp, "celery")
    load_plugins(settings)
    redis.Redis.from_url(settings.redis_url).flushdb()
    worker = CeleryWorker(settings, "bench", tmp)  # a real `crucible worker`, as the integration tests start it
    log = open(tmp / "celery-bare-worker.log", "ab")
    bare_worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys; sys.path.insert(0, '.'); from bench.dispatch import bare_celery_app; "
                f"bare_celery_app({settings.redis_url!r}).worker_main(['worker', '-c', '1', '--loglevel', 'WARNING', "
                "'-n', 'bench@bare', '--without-gossip', '--without-mingle'])"
            ),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    executor = CeleryExecutor(settings)
    executor.start()
    try:
        app = bare_celery_app(settings.redis_url)
        return measure(settings, executor, n, lambda: app.send_task(CELERY_BARE_TASK, args=[WORK_S]).get(timeout=120))
    finally:
        executor.stop()
        worker.stop(timeout=60)
        bare_worker.terminate()
        bare_worker.wait(timeout=60)


def bench_ray(tmp: Path, n: int) -> dict[str, float]:
    import ray

    from workers.executors.ray import RayExecutor, runtime_env
    from workers.settings import load_plugins

    settings = make_settings(tmp, "ray")
    load_plugins(settings)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=runtime_env(settings),
    )

    @ray.remote(num_cpus=1)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    executor = RayExecutor(settings)
    executor.start()
    try:
        return measure(settings, executor, n, lambda: ray.get(sleep.remote(WORK_S)))
    finally:
        executor.stop()
        ray.shutdown()


def bench_submissions(tmp: Path, n: int) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import make_key

    settings = make_settings(tmp, "local")
    with TestClient(create_app(settings, run_executor=False)) as client:
        client.headers["Authorization"] = f"Bearer {make_key(settings)}"
        body = {"method": "test-counter", "params": {"steps": 1}}
        client.post("/api/v1/jobs", json=body)
        t = time.perf_counter()
        for _ in range(n):
            assert client.post("/api/v1/jobs", json=body).status_code == 201
        took = time.perf_counter() - t
    return {"submissions": n, "per_s": n / took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="timed rounds (after WARM_UPS discarded ones)")
    parser.add_argument("--submissions", type=int, default=200)
    args = parser.parse_args()
    if SERVICES.get("CRUCIBLE_SERVICES_MISSING"):
        sys.exit(f"services unavailable: {SERVICES['CRUCIBLE_SERVICES_MISSING']} (run scripts/setup/services.sh)")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", SERVICES["AWS_ACCESS_KEY_ID"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SERVICES["AWS_SECRET_ACCESS_KEY"])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {
            "celery": bench_celery(tmp, args.jobs),
            "ray": bench_ray(tmp, args.jobs),
            "api": bench_submissions(tmp, args.submissions),
        }
    print(f"{'1 s job, queued → finished':32} {'bare':>8} {'Crucible':>9} {'ratio':>7}")
    for name in ("celery", "ray"):
        r = results[name]
        for key, label in (("crucible", name), ("with_checkpoints", f"{name} + 2 checkpoints, artifact, model")):
            row = r[key]
            print(
                f"{label:32} {r['bare_s']:7.2f}s {row['s']:8.2f}s {row['ratio']:6.2f}×   "
                f"(queued → claimed {row['queued_to_claimed_s']:.2f}s, "
                f"claimed → finished {row['claimed_to_finished_s']:.2f}s)"
            )
    print(f"{'submissions/s, one API process':32} {results['api']['per_s']:8.1f}")
    out = REPO / "bench" / "results" / "dispatch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "jobs": args.jobs, "work_s": WORK_S, **results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
