"""One attempt of a job in a child process, supervised: what a Celery or Ray task does with a job.

The task claims the job (compare-and-set, so a redelivered or duplicated message finds it taken and
does nothing), forks the job process from the worker's pre-imported fork server
(`workers.job_start`: milliseconds, not the seconds a fresh interpreter spends importing torch) and
watches the row while it runs:

- `cancelling`: the job stops cooperatively (its reporter sees the flag); after the cancel grace
  it gets SIGTERM, then SIGKILL;
- the row moved on (the reaper or a shutting-down worker re-queued it, so this attempt is fenced
  off): SIGTERM at once, then SIGKILL;
- the process ended without publishing a final state: the job is released (re-queued from its last
  checkpoint while attempts remain).

The child dies with the fork server, and the fork server with the worker (PR_SET_PDEATHSIG and the
fork server's own liveness pipe), so a worker killed with -9 leaves no job process heart-beating
behind it; the reaper then re-queues the job once its lease expires.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from workers import lifecycle
from workers.db import session_scope
from workers.job_start import KILL_AFTER_TERM_S
from workers.settings import Settings
from workers.tables import ACTIVE, Job, utcnow

if TYPE_CHECKING:
    from workers.job_start import ForkedJob

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it exits (no orphaned jobs)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def run_attempt(
    job_id: str,
    attempt: int,
    settings: Settings,
    owner: str,
    *,
    cwd: str | None = None,
    poll_s: float = 0.5,
    on_started: Callable[[int], None] | None = None,
) -> str:
    """Claim and run one attempt; returns 'skipped' when the job was not ours to run, else how it ended."""
    with session_scope(settings.database_url) as s:
        if not lifecycle.claim(s, job_id, attempt, owner, settings.lease_s):
            return "skipped"
    from workers.job_start import start_job_process

    env = {**settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with ThreadPoolExecutor(1) as pool:
        # The first start in a worker waits for its fork server to import torch (seconds on a busy
        # machine); the claimed job's lease is kept alive meanwhile.
        starting = pool.submit(
            start_job_process,
            job_id,
            attempt,
            owner,
            env,
            settings.log_dir / f"{job_id}.a{attempt}.log",
            settings.home / "run",
            cwd=cwd if cwd and os.path.isdir(cwd) else None,
            die_with_server=True,
        )
        while not starting.done():
            _keep_starting_lease(job_id, attempt, settings)
            wait([starting], timeout=poll_s)
        proc = starting.result()
    if on_started:
        on_started(proc.pid)
    return supervise(proc, job_id, attempt, owner, settings, poll_s)


def _keep_starting_lease(job_id: str, attempt: int, settings: Settings) -> None:
    """Heart-beat a job of ours that is still `starting` (before its own reporter runs)."""
    try:
        with session_scope(settings.database_url) as s:
            row = s.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).first()
            if row is not None and row.status == "starting" and row.attempt == attempt:
                lifecycle.heartbeat(s, job_id, attempt, settings.lease_s)
    except OperationalError as exc:  # the database restarts: look again on the next tick
        print(f"[crucible] supervisor of {job_id}: {type(exc).__name__}", file=sys.stderr, flush=True)


def supervise(
    proc: ForkedJob | subprocess.Popen[bytes],
    job_id: str,
    attempt: int,
    owner: str,
    settings: Settings,
    poll_s: float,
) -> str:
    stop_since: float | None = None  # when we decided the process must stop
    term_at: float | None = None
    while proc.poll() is None:
        try:
            with session_scope(settings.database_url) as s:
                row = s.execute(select(Job.status, Job.attempt, Job.lease_owner).where(Job.id == job_id)).first()
                if row is not None and row.status == "starting" and row.attempt == attempt:
                    # the job process heart-beats once it is up; until then (dataset, model) we do
                    lifecycle.heartbeat(s, job_id, attempt, settings.lease_s)
        except OperationalError as exc:  # the database restarts: the job keeps running, we look again
            print(f"[crucible] supervisor of {job_id}: {type(exc).__name__}", file=sys.stderr, flush=True)
            time.sleep(poll_s)
            continue
        now = time.monotonic()
        ours = row is not None and row.attempt == attempt and row.lease_owner == owner and row.status in ACTIVE
        if not ours or row.status == "cancelling":
            # a job that published its own final state is exiting: let it finish its closing writes
            done_itself = row is not None and row.attempt == attempt and row.status not in ACTIVE
            grace = settings.cancel_grace_s if ours else (KILL_AFTER_TERM_S if done_itself else 0.0)
            stop_since = stop_since or now
            if term_at is None and now - stop_since >= grace:
                proc.terminate()
                term_at = now
            elif term_at is not None and now - term_at >= KILL_AFTER_TERM_S:
                proc.kill()
        _wait_for_exit(proc, poll_s)
    code = proc.returncode
    for wait_s in (0.5, 1, 2, 4, 8, 0):  # if the database stays away, the reaper settles it later
        try:
            return _settle(job_id, attempt, owner, code, settings)
        except OperationalError:
            time.sleep(wait_s)
    return "unknown"


def _wait_for_exit(proc: ForkedJob | subprocess.Popen[bytes], poll_s: float) -> None:
    """Sleep one poll interval, waking the moment a forked job exits (its sentinel becomes readable),
    so the worker takes its next job without waiting out the interval."""
    sentinel = getattr(getattr(proc, "process", None), "sentinel", None)
    if sentinel is None:
        time.sleep(poll_s)
    else:
        from multiprocessing.connection import wait as wait_ready

        wait_ready([sentinel], timeout=poll_s)


def _settle(job_id: str, attempt: int, owner: str, code: int, settings: Settings) -> str:
    """The process has ended: if it did not publish a final state, release the job."""
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status not in ACTIVE or job.lease_owner != owner:
            return job.status if job is not None and job.attempt == attempt else "lost"
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return lifecycle.release_lost(s, job, f"job process ended with {how} before finishing")


def preempt(settings: Settings, owner_prefix: str, reason: str) -> list[str]:
    """Re-queue every active job held by owners under `owner_prefix` (a worker shutting down).

    The attempt moves on, which fences the running processes off (they stop, and their supervisors
    kill what does not), and the job resumes elsewhere from its last checkpoint. Preemption is not
    the job's fault, so it does not spend the retry budget (max_attempts grows with attempt).
    """
    requeued = []
    with session_scope(settings.database_url) as s:
        jobs = s.scalars(select(Job).where(Job.status.in_(ACTIVE), Job.lease_owner.startswith(owner_prefix))).all()
        for job in jobs:
            if job.status == "cancelling":
                lifecycle.release_lost(s, job, reason)
                continue
            moved = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.attempt == job.attempt, Job.status.in_(("starting", "running")))
                .values(
                    status="queued",
                    attempt=Job.attempt + 1,
                    max_attempts=Job.max_attempts + 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    heartbeat_at=utcnow(),
                    error=reason,
                    failure_code="preempted",
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if moved:
                requeued.append(job.id)
    return requeued
