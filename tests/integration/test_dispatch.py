"""The dispatcher's outbox rules and worker preemption, on SQLite (no servers needed)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from workers import lifecycle
from workers.db import session_scope
from workers.executors.dispatch import Dispatch, Dispatcher, queue_for
from workers.executors.job_process import preempt
from workers.settings import Settings
from workers.tables import Job, utcnow


def add_job(settings: Settings, **values) -> str:
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", **values)
        s.add(job)
        s.flush()
        return job.id


def row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id)


def test_each_queued_attempt_is_sent_once_highest_priority_first_and_again_if_its_message_is_lost(settings):
    sent: list[Dispatch] = []
    low = add_job(settings, priority=1)
    high = add_job(settings, priority=7, resources={"gpus": 1})
    first, second = Dispatcher(settings, "celery", sent.append), Dispatcher(settings, "celery", sent.append)
    assert first.tick() == 2 and second.tick() == 0  # two dispatchers, one message per attempt
    assert [d.job_id for d in sent] == [high, low]
    assert queue_for(sent[0].resources) == "gpu" and queue_for(sent[1].resources) == "cpu"
    with session_scope(settings.database_url) as s:  # the message went missing: its re-send deadline passes
        s.execute(update(Job).where(Job.id == low).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert second.tick() == 1 and sent[-1].job_id == low


def test_a_failed_send_leaves_the_job_to_be_sent_again(settings):
    job_id = add_job(settings)

    def broken(_: Dispatch) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        Dispatcher(settings, "celery", broken).tick()
    assert row(settings, job_id).lease_owner is None
    sent: list[Dispatch] = []
    assert Dispatcher(settings, "celery", sent.append).tick() == 1


def test_reopen_resends_what_was_sent_but_never_claimed_and_nothing_else(settings):
    sent: list[Dispatch] = []
    lost, claimed, other = add_job(settings), add_job(settings), add_job(settings)
    ray = Dispatcher(settings, "ray", sent.append)
    assert ray.tick() == 3
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim(s, claimed, 1, "ray:host:1", 30)
    assert ray.reopen(lost, 2) == 0  # another attempt's message
    assert ray.reopen(lost, 1) == 1 and ray.tick() == 1 and sent[-1].job_id == lost
    assert ray.reopen() == 2  # `lost` again, and `other`; never the claimed one
    assert row(settings, claimed).status == "starting" and row(settings, other).lease_owner is None


def test_a_new_ray_driver_resends_what_the_previous_one_sent_and_a_task_that_died_unclaimed(settings, monkeypatch):
    """Ray tasks die with their driver (the API process): the chaos soak (bench/chaos.py) found jobs sent
    just before an API restart waiting the whole RESEND_AFTER_S (10 min) to be sent again."""
    ray = pytest.importorskip("ray")
    from workers.executors import ray as ray_executor

    orphan, dying = add_job(settings), add_job(settings)
    Dispatcher(settings, "ray", lambda _: None).tick()  # the previous driver sent both, then died
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(Dispatcher, "start", lambda self: None)
    executor = ray_executor.RayExecutor(settings.model_copy(update={"executor": "ray", "ray_address": "127.0.0.1:1"}))
    executor.start()
    assert row(settings, orphan).lease_owner is None and row(settings, dying).lease_owner is None

    class Ref:
        def hex(self) -> str:
            return "ref"

    Dispatcher(settings, "ray", lambda _: None).tick()  # this driver sent them again
    executor.refs = {dying: (1, Ref(), None)}
    monkeypatch.setattr(ray, "wait", lambda refs, **_: (refs, []))  # its task ended without claiming
    executor._watch()
    assert row(settings, dying).lease_owner is None and row(settings, orphan).lease_owner == "sent:ray"
    assert not executor.refs


def test_a_shutting_down_worker_requeues_its_jobs_without_spending_their_retry_budget(settings):
    mine, other, stopping = add_job(settings), add_job(settings), add_job(settings)
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim(s, mine, 1, "celery:w1@host:11", 30)
        assert lifecycle.claim(s, other, 1, "celery:w2@host:12", 30)
        assert lifecycle.claim(s, stopping, 1, "celery:w1@host:13", 30)
        assert lifecycle.request_cancel(s, stopping) == "cancelling"
    assert preempt(settings, "celery:w1@host:", "shutting down") == [mine]
    job = row(settings, mine)
    assert (job.status, job.attempt, job.max_attempts, job.failure_code) == ("queued", 2, 4, "preempted")
    assert row(settings, other).status == "starting"
    assert row(settings, stopping).status == "cancelled"
