"""Hands queued jobs to a distributed engine (Celery, Ray) and reaps expired leases.

The job row is the outbox: a queued row is marked as sent (`lease_owner = 'sent:<engine>'`, with a
re-send deadline) by a compare-and-set before its message goes out, so of several dispatchers (the
API process and every `crucible worker`) one sends each attempt. A message lost on the way (broker
restart, failed send) is sent again once the deadline passes; a duplicate is harmless because only
one task can claim the attempt. The reaper re-queues jobs whose worker stopped heart-beating
(attempt + 1, to resume from their last checkpoint) or fails them when the retry budget is spent.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, update

from workers import lifecycle
from workers.db import session_scope
from workers.settings import Settings
from workers.tables import Job, utcnow

RESEND_AFTER_S = 600.0  # a queued job whose message went missing is sent again after this long
BATCH = 64


def round_robin(rows: list[Any]) -> list[Any]:
    """Rows interleaved across projects (each project's in their given order), so one project's burst
    does not fill the broker's queue ahead of everyone else's."""
    by_project: dict[str, list[Any]] = {}
    for row in rows:
        by_project.setdefault(row.project, []).append(row)
    queues = list(by_project.values())
    out: list[Any] = []
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out


@dataclass(frozen=True)
class Dispatch:
    """What a message needs: the row stays the truth, the message carries only job id and attempt."""

    job_id: str
    attempt: int
    priority: int
    resources: dict[str, Any]


def queue_for(resources: dict[str, Any]) -> str:
    """The resource class a job waits in: `gpu` when it asks for any GPU, else `cpu`."""
    return "gpu" if float(resources.get("gpus", 0) or 0) > 0 else "cpu"


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        engine: str,
        send: Callable[[Dispatch], None],
        poll_s: float = 0.25,
        on_tick: Callable[[], None] | None = None,
    ):
        self.settings, self.engine, self.send, self.poll_s = settings, engine, send, poll_s
        self.on_tick = on_tick
        self.marker = f"sent:{engine}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reap = float("-inf")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"{self.engine}-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=timeout)

    def notify(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a database or broker outage: keep going, the next tick retries
                print(f"[crucible] {self.engine} dispatcher: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tick(self) -> int:
        # A nudge (a submission) sends at once; reaping and the tick hook keep to the poll interval,
        # so a burst of submissions does not also run a burst of lease scans ahead of its messages.
        if time.monotonic() - self._last_reap >= self.poll_s:
            self._last_reap = time.monotonic()
            with session_scope(self.settings.database_url) as s:
                lifecycle.reap_expired(s)
            if self.on_tick:
                self.on_tick()
        sent = 0
        while (n := self._send_batch()) > 0:
            sent += n
        return sent

    def _send_batch(self) -> int:
        now = utcnow()
        with session_scope(self.settings.database_url) as s:
            rows = list(
                s.scalars(
                    lifecycle.fair_queue()
                    .where(or_(Job.lease_owner.is_(None), Job.lease_expires_at < now))
                    .limit(BATCH)
                )
            )
        sent = 0
        for row in round_robin(rows):
            if not self._mark_sent(row.id, row.attempt, now):
                continue  # another dispatcher took it, or it was claimed or cancelled meanwhile
            try:
                self.send(Dispatch(row.id, row.attempt, row.priority, dict(row.resources or {})))
            except Exception:
                self.reopen(row.id, row.attempt)
                raise
            sent += 1
        return sent

    def _mark_sent(self, job_id: str, attempt: int, now: Any) -> bool:
        with session_scope(self.settings.database_url) as s:
            return (
                s.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.attempt == attempt,
                        Job.status == "queued",
                        or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),
                    )
                    .values(lease_owner=self.marker, lease_expires_at=now + timedelta(seconds=RESEND_AFTER_S))
                    .execution_options(synchronize_session=False)
                ).rowcount
                == 1
            )

    def reopen(self, job_id: str | None = None, attempt: int | None = None) -> int:
        """Make a queued attempt that this engine was sent, but never claimed, sendable again at once (all of
        them without arguments): for a message known not to arrive, rather than waiting RESEND_AFTER_S.
        A claimed, re-queued or cancelled job does not match, so a message that did arrive is not repeated."""
        stmt = update(Job).where(Job.status == "queued", Job.lease_owner == self.marker)
        if job_id is not None:
            stmt = stmt.where(Job.id == job_id, Job.attempt == attempt)
        with session_scope(self.settings.database_url) as s:
            return s.execute(
                stmt.values(lease_owner=None, lease_expires_at=None).execution_options(synchronize_session=False)
            ).rowcount
