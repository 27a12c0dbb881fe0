"""The Celery executor: jobs travel over a Redis broker to `crucible worker` processes.

A message carries only `job_id` and `attempt`; the database row stays the truth. Settings follow
Celery's own advice for long, must-not-be-lost tasks: `acks_late` (ack after the job, so a worker
that dies mid-job leaves the message to be redelivered), `task_reject_on_worker_lost` (a killed
pool child does not ack either), prefetch 1 (a worker holds one message per free slot), and a
visibility timeout longer than any job, so Redis does not hand a running job to a second worker.
Duplicates that still happen are harmless: only one task can claim the attempt. Jobs wait in one
queue per resource class (`cpu`, `gpu`) ordered by job priority.

A worker that is asked to stop (SIGTERM) re-queues the jobs it runs (they resume elsewhere from
their last checkpoint) instead of waiting hours for them; a worker that dies is noticed by the
reaper when its jobs' leases expire.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery, signals
from kombu import Queue

from workers.executors.dispatch import Dispatch, Dispatcher, queue_for
from workers.executors.job_process import preempt, run_attempt
from workers.job_start import warm_up
from workers.settings import Settings

TASK = "crucible.run_job"
QUEUES = ("cpu", "gpu")
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600  # longer than any job: Redis must not redeliver a running one


def celery_priority(job_priority: int) -> int:
    """Job priority 9 runs first; kombu's Redis transport serves priority 0 first."""
    return 9 - max(0, min(9, int(job_priority)))


def make_celery_app(settings: Settings) -> Celery:
    app = Celery("crucible", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="cpu",
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name=TASK, bind=True)
    def run_job_task(task: Any, job_id: str, attempt: int) -> str:
        owner = f"celery:{task.request.hostname}:{os.getpid()}"
        return run_attempt(job_id, attempt, settings, owner, cwd=os.getcwd())

    return app


class CeleryExecutor:
    """Runs in the API process (and in every worker): sends queued jobs to their queue and reaps."""

    def __init__(self, settings: Settings, poll_s: float = 0.25):
        self.settings = settings
        self.app = make_celery_app(settings)
        self.dispatcher = Dispatcher(settings, "celery", self.send, poll_s=poll_s)

    def send(self, d: Dispatch) -> None:
        self.app.send_task(
            TASK, args=[d.job_id, d.attempt], queue=queue_for(d.resources), priority=celery_priority(d.priority)
        )

    def start(self) -> None:
        self.dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.dispatcher.stop(timeout)

    def notify(self) -> None:
        self.dispatcher.notify()


def default_queues() -> list[str]:
    import torch

    return ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]


def run_worker(
    settings: Settings, queues: list[str], concurrency: int, name: str | None = None, loglevel: str = "INFO"
) -> None:
    """`crucible worker`: a Celery worker that also dispatches and reaps, so the stack needs no API to recover."""
    executor = CeleryExecutor(settings, poll_s=max(1.0, settings.heartbeat_s))
    app, dispatcher = executor.app, executor.dispatcher
    nodename = name or f"crucible-{socket.gethostname()}-{os.getpid()}@{socket.gethostname()}"

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        warm_up(
            settings
        )  # the fork server imports torch, the runner and plugins and connects now, not at the first job
        dispatcher.start()

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(sender: str | None = None, **_: Any) -> None:
        dispatcher.stop(timeout=2)
        moved = preempt(settings, f"celery:{sender or nodename}:", "the worker was shut down; resuming elsewhere")
        if moved:
            print(f"[crucible] worker shutting down: re-queued {', '.join(moved)}", flush=True)

    # A task only claims, forks and supervises (the job runs in its own forked process), so a thread
    # per task is enough, and threads share the worker's one pre-imported fork server.
    app.worker_main(
        [
            "worker",
            "-P",
            "threads",
            "-Q",
            ",".join(queues),
            "-c",
            str(concurrency),
            "-n",
            nodename,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )
