"""`run_job(job_id)`: the one function that does a job's work, wherever an executor runs it.

It claims the job (or takes over a claim its executor made), resolves method, params and dataset,
runs the method against a `JobRunContext`, and publishes the final state with the attempt as a
fencing token. A crash anywhere leaves the row active; the executor or the reaper then decides
(re-queue from the last checkpoint, or fail with the reason).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from typing import Any, TextIO

from sqlalchemy.orm import Session

from models.registry import get_method
from models.reproduction import get_reproduction, run_reproduction
from workers import lifecycle
from workers.context import JobRunContext
from workers.datasets import load_dataset
from workers.db import session_scope
from workers.quiet import quiet_third_party
from workers.redact import scrub_paths, server_roots
from workers.settings import Settings, load_plugins
from workers.storage import open_store
from workers.tables import Job


def worker_identity(executor: str) -> str:
    return f"{executor}:{socket.gethostname()}:{os.getpid()}"


class _Tee:
    """Copies what the method prints into the job's log while still writing to the real stream."""

    def __init__(self, stream: TextIO, ctx: JobRunContext):
        self.stream, self.ctx = stream, ctx

    def write(self, text: str) -> int:
        self.ctx.write_log(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def pick_device(resources: dict[str, Any]) -> str:
    """cuda when the job asked for GPUs and this worker has one; also pins torch's CPU threads to the
    job's `cpus`, since default threading oversubscribes a shared machine (and changes results)."""
    import torch

    torch.set_num_threads(max(1, int(float(resources.get("cpus", 1) or 1))))
    return "cuda" if float(resources.get("gpus", 0) or 0) > 0 and torch.cuda.is_available() else "cpu"


def summarize(s: Session, job_id: str) -> dict[str, Any]:
    """The last value of every metric (of every attempt), for job listings and the CLI's closing summary."""
    from sqlalchemy import func, select

    from workers.tables import Metric

    last = (
        select(Metric.name, func.max(Metric.step).label("step"))
        .where(Metric.job_id == job_id)
        .group_by(Metric.name)
        .subquery()
    )
    rows = s.execute(
        select(Metric.name, Metric.value)
        .join(last, (Metric.name == last.c.name) & (Metric.step == last.c.step))
        .where(Metric.job_id == job_id)
    )
    return {name: value for name, value in rows}


def run_job(
    job_id: str,
    settings: Settings,
    *,
    attempt: int | None = None,
    claimed_by: str | None = None,
    executor: str = "local",
) -> str:
    """Run one attempt of a job; returns the final status it published (or 'skipped')."""
    quiet_third_party()  # before the method's module imports its libraries: their noise stays out of the log
    load_plugins(settings)
    owner = claimed_by or worker_identity(executor)
    with session_scope(settings.database_url) as s:  # one round of reads and (local executor) the claim
        job = s.get(Job, job_id)
        if job is None:
            return "skipped"
        attempt = attempt or job.attempt
        if claimed_by is None:
            if not lifecycle.claim(s, job_id, attempt, owner, settings.lease_s):
                return "skipped"  # someone else has it, or it was cancelled first
            s.refresh(job)
        if job.attempt != attempt or job.status not in lifecycle.ACTIVE or job.lease_owner != owner:
            return "skipped"
        s.expunge(job)

    store = open_store(settings.storage_url, settings.s3_endpoint, settings.s3_region)
    try:
        with session_scope(settings.database_url) as s:
            dataset = load_dataset(s, store, job.dataset, job.project) if job.dataset else None
        ctx = JobRunContext(job, dataset, settings, store, pick_device(job.resources or {}))
    except Exception as exc:
        with session_scope(settings.database_url) as s:
            lifecycle.finish(
                s,
                job_id,
                attempt,
                "failed",
                error=f"could not prepare the job: {failure_reason(exc, settings)}",
                failure_code="setup_error",
            )
        return "failed"

    ctx.start()
    previous = signal.getsignal(signal.SIGTERM)
    if threading_main():
        signal.signal(signal.SIGTERM, lambda *_: ctx.request_cancel())
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, ctx), _Tee(err, ctx)  # type: ignore[assignment]
    status, error, code, record = "succeeded", None, None, None
    try:
        with session_scope(settings.database_url) as s:
            lifecycle.mark_running(s, job_id, attempt)
        print(f"[crucible] {job.mode} {job.method} on {ctx.device}", flush=True)
        if attempt > 1:
            print(f"--- attempt {attempt} (resuming from the last checkpoint if there is one) ---")
        if job.mode == "reproduce":
            spec = get_reproduction(job.method)
            record = run_reproduction(spec, ctx, seed=job.seed, smoke=bool(job.params.get("smoke", False)))
            ctx.save_artifact("reproduction.json", record, kind="json")
        else:
            get_method(job.method).invoke(ctx, job.params)
        if ctx.cancel_observed:
            status, code = "cancelled", "cancelled"
    except lifecycle.StaleAttempt:
        status = "lost"
    except InterruptedError as exc:  # a reproduction (or a method run outside invoke) stopped on cancel
        if ctx.cancel_observed or ctx.cancelled():
            status, code = "cancelled", "cancelled"
        else:
            status, code = "failed", "exception"
            error = failure_reason(exc, settings)
            print(log_traceback(exc, settings), file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - the job's failure is recorded, never raised further
        status, code = "failed", "exception"
        error = failure_reason(exc, settings)
        print(log_traceback(exc, settings), file=sys.stderr)
    finally:
        sys.stdout, sys.stderr = out, err
        if threading_main():
            signal.signal(signal.SIGTERM, previous)
        try:
            ctx.close()
        except lifecycle.StaleAttempt:
            status = "lost"
    if status == "lost" or ctx.lost:
        return "lost"
    with session_scope(settings.database_url) as s:
        result: dict[str, Any] = {"metrics": summarize(s, job_id)}
        if record is not None:
            result["reproduction"] = record
        lifecycle.finish(s, job_id, attempt, status, error=error, failure_code=code, result=result)
    return status


def failure_reason(exc: BaseException, settings: Settings) -> str:
    """A failed job's `error`: the exception's type and message, never its traceback (the job's log has that),
    with this server's paths cut to their file names (`scrub_paths`)."""
    message = str(exc).strip() or "(no message)"
    return scrub_paths(f"{type(exc).__name__}: {message}", server_roots(settings.home))[:2000]


def log_traceback(exc: BaseException, settings: Settings) -> str:
    """The traceback a failed job's log shows its owner (the last 8,000 characters): file names, lines and code
    kept, the folders above them cut as in `failure_reason`, so the log does not tell where the server keeps its
    state or its code."""
    text = "".join(traceback.format_exception(exc))[-8000:]
    return scrub_paths(text, server_roots(settings.home))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
