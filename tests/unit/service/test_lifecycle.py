from datetime import timedelta

import pytest

from workers import lifecycle
from workers.db import session_scope
from workers.tables import Job, utcnow


def queued_job(settings, **kw) -> str:
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", params={}, **kw)
        s.add(job)
        s.flush()
        return job.id


def status_of(settings, job_id):
    with session_scope(settings.database_url) as s:
        j = s.get(Job, job_id)
        return j.status, j.attempt, j.failure_code


def test_only_one_of_two_claimants_wins(settings):
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        first = lifecycle.claim(s, jid, 1, "w1", 30)
    with session_scope(settings.database_url) as s:
        second = lifecycle.claim(s, jid, 1, "w2", 30)
    assert (first, second) == (True, False)


def test_writes_from_a_stale_attempt_are_fenced(settings):
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim(s, jid, 1, "w1", 30)
        job = s.get(Job, jid)
        assert lifecycle.release_lost(s, job, "test") == "queued"
    assert status_of(settings, jid)[:2] == ("queued", 2)
    with session_scope(settings.database_url) as s, pytest.raises(lifecycle.StaleAttempt):
        lifecycle.fence(s, jid, 1)
    with session_scope(settings.database_url) as s:
        assert not lifecycle.finish(s, jid, 1, "succeeded")
        assert lifecycle.heartbeat(s, jid, 1, 30) is None


def test_cancel_in_every_state(settings):
    queued = queued_job(settings)
    with session_scope(settings.database_url) as s:
        assert lifecycle.request_cancel(s, queued) == "cancelled"
    running = queued_job(settings)
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, running, 1, "w", 30)
        lifecycle.mark_running(s, running, 1)
        assert lifecycle.request_cancel(s, running) == "cancelling"
        assert lifecycle.request_cancel(s, running) == "cancelling"  # idempotent
        assert lifecycle.finish(s, running, 1, "cancelled")
    for jid in (queued, running):
        with session_scope(settings.database_url) as s, pytest.raises(lifecycle.JobStateConflict):
            lifecycle.request_cancel(s, jid)
    with session_scope(settings.database_url) as s, pytest.raises(lifecycle.JobNotFound):
        lifecycle.request_cancel(s, "nope")


def test_terminal_states_are_absorbing(settings):
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, jid, 1, "w", 30)
        assert lifecycle.finish(s, jid, 1, "succeeded")
        assert not lifecycle.finish(s, jid, 1, "failed")
        assert not lifecycle.claim(s, jid, 1, "w2", 30)
    assert status_of(settings, jid)[0] == "succeeded"


def test_a_lost_worker_requeues_without_spending_the_budget_until_the_ceiling(settings):
    """A worker killed under its job (lease expired) is not the job's fault: the chaos soak (bench/chaos.py)
    failed a job with `worker_lost` after its workers were killed three times. Only past the ceiling does a
    loss count, so a job that stops its own heartbeats still ends."""
    jid = queued_job(settings, max_attempts=2)
    for attempt in (1, 2, 3):
        with session_scope(settings.database_url) as s:
            assert lifecycle.claim(s, jid, attempt, "w", lease_s=30)
        with session_scope(settings.database_url) as s:
            assert lifecycle.reap_expired(s, now=utcnow() + timedelta(seconds=60)) == [(jid, "queued")]
    with session_scope(settings.database_url) as s:
        job = s.get(Job, jid)
        assert (job.status, job.attempt, job.max_attempts, job.failure_code) == ("queued", 4, 5, "worker_lost")
        job.attempt = job.max_attempts = lifecycle.FREE_LOSSES_CEILING
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim(s, jid, lifecycle.FREE_LOSSES_CEILING, "w", lease_s=30)
    with session_scope(settings.database_url) as s:
        assert lifecycle.reap_expired(s, now=utcnow() + timedelta(seconds=60)) == [(jid, "failed")]


def test_a_job_whose_own_process_died_spends_its_budget(settings):
    """Its worker saw it die (out of memory, a segfault, os._exit): retried from its checkpoint, then failed."""
    jid = queued_job(settings, max_attempts=2)
    for attempt, expected in ((1, "queued"), (2, "failed")):
        with session_scope(settings.database_url) as s:
            assert lifecycle.claim(s, jid, attempt, "w", lease_s=30)
            assert lifecycle.release_lost(s, s.get(Job, jid), "job process ended with signal 9") == expected
    assert status_of(settings, jid) == ("failed", 2, "worker_lost")


def test_reaper_leaves_live_leases_alone(settings):
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, jid, 1, "w", lease_s=30)
    with session_scope(settings.database_url) as s:
        assert lifecycle.reap_expired(s) == []


def test_lost_cancelling_job_ends_cancelled(settings):
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, jid, 1, "w", 30)
        lifecycle.request_cancel(s, jid)
    with session_scope(settings.database_url) as s:
        lifecycle.reap_expired(s, now=utcnow() + timedelta(seconds=60))
    assert status_of(settings, jid)[0] == "cancelled"


@pytest.mark.parametrize(("status", "done"), [("succeeded", 3), ("failed", 2), ("cancelled", 2)])
def test_a_succeeded_job_ends_with_a_full_bar_and_others_where_they_stopped(settings, status, done):
    """A reproduction's inner loops report their own totals last (2 of 3); success means all of it ran."""
    jid = queued_job(settings)
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim(s, jid, 1, "w1", 30)
        assert lifecycle.set_progress(s, jid, 1, 2, 3, "seed 2")
        assert lifecycle.finish(s, jid, 1, status)
    with session_scope(settings.database_url) as s:
        job = s.get(Job, jid)
        assert (job.progress_done, job.progress_total) == (done, 3)
