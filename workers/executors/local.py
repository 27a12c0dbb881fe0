"""The local executor: one process per job on this machine (forked from a pre-imported server), the embedded default.

A dispatcher thread claims queued jobs (compare-and-set, so a second executor on the same
database cannot take the same job), starts `python -m workers.run_job` for each up to a
concurrency limit, captures its output to a log file, and watches it: a job marked cancelling is
given a grace period to stop cooperatively, then SIGTERM, then SIGKILL; a process that dies without
publishing a final state is released (re-queued from its last checkpoint while attempts remain).
At start-up it releases jobs left active by a previous executor of the same state folder.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from sqlalchemy import select

from workers import lifecycle
from workers.db import session_scope
from workers.job_start import KILL_AFTER_TERM_S, ForkedJob, start_job_process, warm_up
from workers.runner import worker_identity
from workers.settings import Settings
from workers.tables import ACTIVE, Job


@dataclass
class _Child:
    job_id: str
    attempt: int
    proc: ForkedJob
    cancel_seen_at: float | None = None
    term_sent_at: float | None = None
    started: float = field(default_factory=time.monotonic)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the job's whole process group (it is a session leader); the process alone if it has not
    become one yet."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ExecutorLockedError(RuntimeError):
    """Another live executor already serves this state folder."""


class LocalExecutor:
    def __init__(self, settings: Settings, poll_s: float = 0.25):
        self.settings = settings
        self.poll_s = poll_s
        self.owner = worker_identity("local")
        self.children: dict[str, _Child] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: IO[str] | None = None
        self._next_beat = 0.0

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(self.settings.home / "executor.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ExecutorLockedError(f"another local executor serves {self.settings.home}") from None
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        self.recover()
        warm_up(self.settings)
        self._thread = threading.Thread(target=self._loop, name="local-executor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching; running jobs get SIGTERM (they checkpoint-and-cancel cooperatively)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=timeout)
        for child in list(self.children.values()):
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + timeout
        for child in list(self.children.values()):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
            self._reap_child(child)
        if self._lock_file:
            self._lock_file.close()

    def notify(self) -> None:
        """A job was queued: dispatch now rather than at the next poll."""
        self._wake.set()

    def recover(self) -> list[tuple[str, str]]:
        """Release jobs that a dead local executor of this state folder left active."""
        released = []
        with session_scope(self.settings.database_url) as s:
            for job in s.scalars(select(Job).where(Job.status.in_(ACTIVE), Job.lease_owner.like("local:%"))):
                reason = "the local executor restarted"  # the server went down under the job: not its fault
                released.append((job.id, lifecycle.release_lost(s, job, reason, job_at_fault=False)))
        return released

    # -- the loop -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # keep serving; the next tick retries
                print(f"[crucible] local executor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        self._watch_children()
        with session_scope(self.settings.database_url) as s:
            lifecycle.reap_expired(s)
        while len(self.children) < self.settings.max_concurrent_jobs and not self._stop.is_set():
            if not self._dispatch_one():
                break

    def _dispatch_one(self) -> bool:
        with session_scope(self.settings.database_url) as s:
            job = s.scalars(lifecycle.fair_queue().limit(1)).first()  # fair share across projects
            if job is None:
                return False
            job_id, attempt = job.id, job.attempt
            if not lifecycle.claim(s, job_id, attempt, self.owner, self.settings.lease_s):
                return True  # lost the race; look again
        log_path = self.settings.log_dir / f"{job_id}.a{attempt}.log"
        proc = start_job_process(
            job_id,
            attempt,
            self.owner,
            {**self.settings.to_env(), "PYTHONUNBUFFERED": "1"},
            log_path,
            self.settings.home / "run",
        )
        self.children[job_id] = _Child(job_id, attempt, proc)
        return True

    def _watch_children(self) -> None:
        if not self.children:
            return
        with session_scope(self.settings.database_url) as s:
            rows = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(list(self.children)))).all())
        now = time.monotonic()
        alive = [c for c in self.children.values() if c.proc.poll() is None]
        if now < self._next_beat:
            alive = []
        else:
            self._next_beat = now + self.settings.heartbeat_s
        with session_scope(self.settings.database_url) as s:
            # A live child process is the best liveness signal there is: keep its lease while it
            # imports and loads data, before its own reporter thread starts heart-beating.
            for child in alive:
                lifecycle.heartbeat(s, child.job_id, child.attempt, self.settings.lease_s)
        for child in list(self.children.values()):
            if child.proc.poll() is not None:
                self._reap_child(child)
                continue
            if rows.get(child.job_id) != "cancelling":
                continue
            child.cancel_seen_at = child.cancel_seen_at or now
            if child.term_sent_at is None and now - child.cancel_seen_at >= self.settings.cancel_grace_s:
                _signal_group(child.proc.pid, signal.SIGTERM)
                child.term_sent_at = now
            elif child.term_sent_at is not None and now - child.term_sent_at >= KILL_AFTER_TERM_S:
                _signal_group(child.proc.pid, signal.SIGKILL)

    def _reap_child(self, child: _Child) -> None:
        """The process is gone: if it did not publish a final state, decide one for it."""
        code = child.proc.poll()
        self.children.pop(child.job_id, None)
        with session_scope(self.settings.database_url) as s:
            job = s.get(Job, child.job_id)
            if job is None or job.attempt != child.attempt or job.status not in ACTIVE:
                return
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            lifecycle.release_lost(s, job, f"job process ended with {how} before finishing")
        self._wake.set()
