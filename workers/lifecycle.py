"""Job state transitions, each one compare-and-set UPDATE.

queued → starting → running → succeeded | failed | cancelled, with cancelling between an active
state and cancelled. Every transition names the state(s) it leaves and, for worker-side writes,
the attempt that makes it; a row that has moved on makes the UPDATE match nothing, so two workers
can never both run a job, and a stale attempt cannot overwrite a newer one. Terminal states are
absorbing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from workers.tables import ACTIVE, TERMINAL, Job, utcnow


class JobNotFound(KeyError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class JobStateConflict(Exception):
    """The job's state does not allow the request (e.g. cancelling a finished job)."""

    def __init__(self, job_id: str, status: str, action: str):
        self.job_id, self.status, self.action = job_id, status, action
        super().__init__(f"job {job_id} is {status}; it cannot be {action}")


class StaleAttempt(Exception):
    """A write from an attempt that no longer owns the job (fencing)."""


def fair_queue() -> Select[tuple[Job]]:
    """Queued jobs in fair-share order: first the projects with the fewest jobs active now, then priority
    (which orders a project's own jobs, never one project's against another's), then age. A project
    that submits a thousand priority-9 jobs runs one at a time alongside everyone else's."""
    active = (
        select(Job.project.label("project"), func.count().label("n"))
        .where(Job.status.in_(ACTIVE))
        .group_by(Job.project)
        .subquery()
    )
    return (
        select(Job)
        .outerjoin(active, active.c.project == Job.project)
        .where(Job.status == "queued")
        .order_by(func.coalesce(active.c.n, 0), Job.priority.desc(), Job.created_at, Job.id)
    )


def _cas(
    session: Session, job_id: str, *, from_status: tuple[str, ...], at_attempt: int | None = None, **values: Any
) -> bool:
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(from_status))
    if at_attempt is not None:
        stmt = stmt.where(Job.attempt == at_attempt)
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def claim(session: Session, job_id: str, attempt: int, owner: str, lease_s: float) -> bool:
    """queued → starting for exactly one claimant."""
    now = utcnow()
    return _cas(
        session,
        job_id,
        from_status=("queued",),
        at_attempt=attempt,
        status="starting",
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_s),
        heartbeat_at=now,
        started_at=now,
        error=None,
        failure_code=None,
    )


def mark_running(session: Session, job_id: str, attempt: int) -> bool:
    return _cas(session, job_id, from_status=("starting",), at_attempt=attempt, status="running")


def heartbeat(session: Session, job_id: str, attempt: int, lease_s: float) -> str | None:
    """Extend the lease; returns the job's status, or None when this attempt no longer owns it."""
    now = utcnow()
    if not _cas(
        session,
        job_id,
        from_status=ACTIVE,
        at_attempt=attempt,
        heartbeat_at=now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    ):
        return None
    return session.scalar(select(Job.status).where(Job.id == job_id))


def fence(session: Session, job_id: str, attempt: int) -> None:
    """Take the job row's write lock for this attempt, or raise StaleAttempt.

    Called at the start of a transaction that writes metrics, logs or artifacts: the UPDATE
    serialises with the reaper's requeue, so a write either lands before the attempt is fenced off
    or not at all.
    """
    if not _cas(session, job_id, from_status=ACTIVE, at_attempt=attempt, heartbeat_at=utcnow()):
        raise StaleAttempt(f"job {job_id} attempt {attempt} no longer owns the job")


def set_progress(session: Session, job_id: str, attempt: int, done: int, total: int, message: str) -> bool:
    return _cas(
        session,
        job_id,
        from_status=ACTIVE,
        at_attempt=attempt,
        progress_done=done,
        progress_total=total,
        progress_message=message[:256],
    )


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    *,
    error: str | None = None,
    failure_code: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    if status not in TERMINAL:
        raise ValueError(f"not a terminal status: {status}")
    # a job that succeeded did all its work, whatever its last progress report said (a reproduction's
    # inner loops report their own totals): its bar ends full
    done: dict[str, Any] = {"progress_done": Job.progress_total} if status == "succeeded" else {}
    return _cas(
        session,
        job_id,
        from_status=ACTIVE,
        at_attempt=attempt,
        status=status,
        **done,
        finished_at=utcnow(),
        error=error,
        failure_code=failure_code,
        result=result,
        lease_owner=None,
        lease_expires_at=None,
    )


def request_cancel(session: Session, job_id: str) -> str:
    """Cancel in any non-terminal state: queued jobs end at once, active ones go to cancelling."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.status == "queued" and _cas(
        session, job_id, from_status=("queued",), status="cancelled", finished_at=utcnow(), failure_code="cancelled"
    ):
        return "cancelled"
    if job.status in ("starting", "running") and _cas(
        session, job_id, from_status=("starting", "running"), status="cancelling"
    ):
        return "cancelling"
    session.refresh(job)
    if job.status == "cancelling":
        return "cancelling"
    if job.status in TERMINAL:
        raise JobStateConflict(job_id, job.status, "cancelled")
    return request_cancel(session, job_id)  # lost a race with a transition; try again on the new state


FREE_LOSSES_CEILING = 20  # past this many attempts a lost worker counts against the job's budget too


def release_lost(session: Session, job: Job, reason: str, *, job_at_fault: bool = True) -> str:
    """A job whose worker is gone: cancel it if cancelling, re-queue it while attempts remain, else fail it.

    `job_at_fault=False` is for a loss the job did not cause (its whole worker vanished: killed, its
    machine or its Ray driver gone, its lease expired): like a preemption it re-queues without spending
    the retry budget, which is meant for jobs that crash (a 10-minute chaos soak, bench/chaos.py, failed
    jobs whose workers were killed under them three times). A job whose own process died under a live
    worker may have caused it (out of memory, a segfault), so that spends the budget; so does every loss
    past FREE_LOSSES_CEILING attempts, which bounds a job that hangs its worker or stops its own
    heartbeats (holding the GIL) from looping forever.
    """
    if job.status == "cancelling":
        _cas(
            session,
            job.id,
            from_status=("cancelling",),
            at_attempt=job.attempt,
            status="cancelled",
            finished_at=utcnow(),
            error=reason,
            failure_code="cancelled",
            lease_owner=None,
        )
        return "cancelled"
    free = not job_at_fault and job.attempt < FREE_LOSSES_CEILING
    if (free or job.attempt < job.max_attempts) and _cas(
        session,
        job.id,
        from_status=("starting", "running"),
        at_attempt=job.attempt,
        status="queued",
        attempt=Job.attempt + 1,
        max_attempts=Job.max_attempts + (1 if free else 0),
        lease_owner=None,
        lease_expires_at=None,
        error=reason,
        failure_code="worker_lost",
    ):
        return "queued"
    _cas(
        session,
        job.id,
        from_status=("starting", "running"),
        at_attempt=job.attempt,
        status="failed",
        finished_at=utcnow(),
        error=f"{reason}; retry budget of {job.max_attempts} attempts spent",
        failure_code="worker_lost",
        lease_owner=None,
    )
    return "failed"


def reap_expired(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    """Release every active job whose lease expired: its worker stopped heart-beating (a worker whose job
    process died settles that itself, see workers.executors.job_process), so the job is not at fault."""
    now = now or utcnow()
    expired = session.scalars(select(Job).where(Job.status.in_(ACTIVE), Job.lease_expires_at < now)).all()
    reason = "worker stopped heart-beating (lease expired)"
    return [(job.id, release_lost(session, job, reason, job_at_fault=False)) for job in expired]
