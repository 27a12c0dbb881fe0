"""The Ray executor: each job attempt runs as a Ray task holding the job's CPUs and GPUs.

It connects to `CRUCIBLE_RAY_ADDRESS` or starts a local Ray (which, from Ray 2.60, requires its
auth token; workers elsewhere get it from `RAY_AUTH_TOKEN` or `~/.ray/auth_token`). The task claims
the attempt and supervises `run_job` in a child process exactly as a Celery task does, so
cancellation is cooperative first (the job's reporter sees `cancelling`), then SIGTERM and SIGKILL
after the grace period; a task that still has not returned is cancelled through Ray with
`force=True`, which kills its worker process and, with it, the job process. Inside the job,
`CRUCIBLE_RAY_ADDRESS` names the cluster, so a method that needs several processes (patch-parallel
diffusion, federated clients) can `ray.init(address=ctx.settings.ray_address)` and start actors.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import ray

from workers.executors.dispatch import Dispatch, Dispatcher
from workers.executors.job_process import run_attempt
from workers.job_start import KILL_AFTER_TERM_S, warm_up
from workers.settings import Settings


@ray.remote(max_retries=0)
def run_job_task(job_id: str, attempt: int, settings: dict[str, Any], cwd: str | None) -> str:
    owner = f"ray:{socket.gethostname()}:{os.getpid()}"
    parsed = Settings.model_validate(settings)
    warm_up(parsed)  # no-op once this worker's fork server runs (the setup hook usually started it)
    return run_attempt(job_id, attempt, parsed, owner, cwd=cwd)


def runtime_env(settings: Settings) -> dict[str, Any]:
    """The Ray job environment of a Crucible driver: every worker Ray starts for it has the settings in
    its environment and starts its job fork server at once (imports, plugins, a warm database
    engine), so a job's start does not pay for it, rather than on its first job."""
    return {"env_vars": settings.to_env(), "worker_process_setup_hook": "workers.job_start.warm_up"}


class RayExecutor:
    def __init__(self, settings: Settings, poll_s: float = 0.25):
        self.settings = settings
        self.dispatcher = Dispatcher(settings, "ray", self.send, poll_s=poll_s, on_tick=self._watch)
        self.refs: dict[str, tuple[int, Any, float | None]] = {}  # job id -> (attempt, ref, cancel seen)
        self._lock = threading.Lock()
        self._started_ray = False
        self._task_settings: dict[str, Any] = {}

    def start(self) -> None:
        if not ray.is_initialized():
            ray.init(
                address=self.settings.ray_address or None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env=runtime_env(self.settings),
            )
            self._started_ray = True
        address = self.settings.ray_address or ray.get_runtime_context().gcs_address
        self._task_settings = self.settings.model_copy(update={"ray_address": address}).model_dump(mode="json")
        # Ray tasks share their driver's fate: what a previous API process sent and no task claimed died
        # with it, so it is sent again now, not RESEND_AFTER_S later (a task of another live driver that
        # is sent twice is harmless: one claim wins, the other task skips)
        self.dispatcher.reopen()
        self.dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.dispatcher.stop(timeout)
        with self._lock:
            for _, ref, _ in self.refs.values():
                ray.cancel(ref, force=True)
            self.refs.clear()
        if self._started_ray:
            ray.shutdown()

    def notify(self) -> None:
        self.dispatcher.notify()

    def send(self, d: Dispatch) -> None:
        cpus = float(d.resources.get("cpus", 1) or 1)
        gpus = float(d.resources.get("gpus", 0) or 0)
        ref = run_job_task.options(num_cpus=cpus, num_gpus=gpus, name=f"crucible-job-{d.job_id}").remote(
            d.job_id, d.attempt, self._task_settings, os.getcwd()
        )
        with self._lock:
            self.refs[d.job_id] = (d.attempt, ref, None)

    def _watch(self) -> None:
        """Forget finished tasks; force-cancel, through Ray, a cancelled job whose task outlived its grace."""
        from sqlalchemy import select

        from workers.db import session_scope
        from workers.tables import Job

        with self._lock:
            items = list(self.refs.items())
        if not items:
            return
        done, _ = ray.wait([ref for _, (_, ref, _) in items], num_returns=len(items), timeout=0)
        finished = {r.hex() for r in done}
        with session_scope(self.settings.database_url) as s:
            states = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_([j for j, _ in items]))).all())
        now = time.monotonic()
        with self._lock:
            for job_id, (attempt, ref, seen) in items:
                if ref.hex() in finished:
                    self.refs.pop(job_id, None)
                    if states.get(job_id) == "queued":  # the task ended before it claimed (its worker died)
                        self.dispatcher.reopen(job_id, attempt)
                elif states.get(job_id) in ("cancelling", "cancelled"):
                    seen = seen or now
                    self.refs[job_id] = (attempt, ref, seen)
                    if now - seen > self.settings.cancel_grace_s + 2 * KILL_AFTER_TERM_S:
                        ray.cancel(ref, force=True)
