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
import select
import signal
import subprocess
import sys
import threading
from multiprocessing import spawn
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.settings import Settings

PRELOAD = ["workers.preload"]
KILL_AFTER_TERM_S = 5.0  # how long a job process gets to exit between SIGTERM and SIGKILL
JOB_PROCESS_PREFIX = "crucible-job-"
_context: ForkServerContext | None = None
_stock_preparation_data = spawn.get_preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    """What a forked child sets up before its target runs, minus the parent's `__main__` for jobs.

    multiprocessing re-runs the parent's main module in every forkserver child (as `__mp_main__`),
    in case the target lives there. A job's target is `_job_main`, importable from here, while the
    parent's main is the Celery CLI or Ray's `default_worker.py`: re-importing them cost each job
    2.6 s of its start (bench/dispatch.py), more than the 1-second job itself.
    """
    data = _stock_preparation_data(name)
    if name.startswith(JOB_PROCESS_PREFIX):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


spawn.get_preparation_data = _preparation_data  # popen_forkserver looks it up on each start


def _fork_server() -> ForkServerContext:
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


_start_lock = threading.Lock()


def warm_up(settings: Settings | None = None) -> None:
    """Start the fork server now (it imports in the background), so the first job does not wait for it.

    With `settings`, the fork server starts with them in its environment, so `workers.preload` also
    imports their plugins and warms their database engine for every job it forks. (It is started as a
    child of this process with this process's environment, hence the variables are set just for the
    start, under a lock, and restored.)
    """
    from multiprocessing import forkserver

    _fork_server()
    with _start_lock:
        if settings is None:
            forkserver.ensure_running()
            return
        saved = {k: v for k, v in os.environ.items() if k.startswith("CRUCIBLE_")}
        os.environ.update(settings.to_env())
        try:
            forkserver.ensure_running()
        finally:
            for key in [k for k in os.environ if k.startswith("CRUCIBLE_")]:
                del os.environ[key]
            os.environ.update(saved)


def _exit_with(supervisor_pid: int) -> None:
    """Kill this job (its whole process group) the moment its supervisor process ends, however it ends.

    A pidfd becomes readable when the process exits, so the watch costs nothing while it waits. (The
    fork server, our parent, outlives a worker killed with -9, so PR_SET_PDEATHSIG would not fire.)
    """
    try:
        fd = os.pidfd_open(supervisor_pid)
    except ProcessLookupError:
        os.killpg(0, signal.SIGKILL)
        return

    def watch() -> None:
        select.select([fd], [], [])
        print(
            f"[crucible] the worker (pid {supervisor_pid}) that supervised this job is gone; stopping",
            file=sys.stderr,
            flush=True,
        )
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="crucible-supervisor-watch", daemon=True).start()


def _job_main(
    job_id: str,
    attempt: int,
    owner: str,
    env: dict[str, str],
    log_path: str,
    pid_path: str,
    cwd: str | None,
    supervisor_pid: int | None,
) -> None:
    os.setsid()
    if cwd:  # where plugin modules named in CRUCIBLE_PLUGINS can be imported from
        os.chdir(cwd)
        sys.path.insert(0, cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    Path(pid_path).write_text(str(os.getpid()))
    if supervisor_pid:
        _exit_with(supervisor_pid)
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

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout or 0)
        return self.process.exitcode

    def terminate(self) -> None:
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        """The job is its own session leader, so its process group holds whatever it started too."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def start_job_process(
    job_id: str,
    attempt: int,
    owner: str,
    env: dict[str, str],
    log_path: Path,
    run_dir: Path,
    *,
    cwd: str | None = None,
    die_with_server: bool = False,
) -> ForkedJob:
    """Fork one attempt of a job; its pid is also written to run_dir/<job_id>.pid for operators.

    `die_with_server`: a Celery or Ray worker killed with -9 must leave no job heart-beating behind it
    (its lease would never expire), so there the job watches the process that started it and dies
    with it. The local executor leaves it off: its restart recovers what was left running.
    """
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = _fork_server().Process(
        target=_job_main,
        name=f"{JOB_PROCESS_PREFIX}{job_id}",
        args=(
            job_id,
            attempt,
            owner,
            env,
            str(log_path),
            str(run_dir / f"{job_id}.pid"),
            cwd,
            os.getpid() if die_with_server else None,
        ),
        daemon=False,
    )
    process.start()
    return ForkedJob(process)
