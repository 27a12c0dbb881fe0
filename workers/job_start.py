"""Starting a job process fast: fork it from a server that has already imported torch and the runner.

A fresh `python -m workers.run_job` pays the torch import (seconds) before the job's first step; a
multiprocessing fork server imports `workers.runner` and the shared training kit once and then forks
a child per job in milliseconds. The child is its own session (so a cancel can signal its whole
group), writes its stdout/stderr to the job's log file, and reports its exit code. The fork server
never runs a tensor operation, so forking after the import is safe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from multiprocessing.context import ForkServerContext
from pathlib import Path

PRELOAD = ["workers.runner", "models.training", "models.plots"]
_context: ForkServerContext | None = None


def _fork_server() -> ForkServerContext:
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def warm_up() -> None:
    """Start the fork server now (it imports in the background), so the first job does not wait for it."""
    from multiprocessing import forkserver

    _fork_server()
    forkserver.ensure_running()


def _job_main(job_id: str, attempt: int, owner: str, env: dict[str, str], log_path: str, pid_path: str) -> None:
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    Path(pid_path).write_text(str(os.getpid()))
    os.environ.update(env)
    code = 1
    try:
        from workers.run_job import main

        code = main([job_id, "--attempt", str(attempt), "--claimed-by", owner])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedJob:
    """The Popen-like face of a forked job process (poll, wait, pid, terminate, kill)."""

    def __init__(self, process: mp.process.BaseProcess):
        self.process = process

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout or 0)
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()


def start_job_process(job_id: str, attempt: int, owner: str, env: dict[str, str], log_path: Path,
                      run_dir: Path) -> ForkedJob:
    """Fork one attempt of a job; its pid is also written to run_dir/<job_id>.pid for operators."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    process = _fork_server().Process(
        target=_job_main, name=f"crucible-job-{job_id}",
        args=(job_id, attempt, owner, env, str(log_path), str(run_dir / f"{job_id}.pid")), daemon=False)
    process.start()
    return ForkedJob(process)
