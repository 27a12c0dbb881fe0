"""run_job in this process: final states, failure reasons, resume from the last checkpoint."""

import json

from workers.db import session_scope
from workers.runner import run_job
from workers.tables import Job


def submit(settings, **params) -> str:
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", params=params, max_attempts=3)
        s.add(job)
        s.flush()
        return job.id


def job_row(settings, job_id) -> Job:
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def test_success_records_summary_and_artifacts(settings, store):
    jid = submit(settings, steps=12, checkpoint_every=4)
    assert run_job(jid, settings) == "succeeded"
    job = job_row(settings, jid)
    assert job.status == "succeeded" and job.result["metrics"]["value"] == 78.0
    assert json.loads(store.get_bytes(f"jobs/{jid}/artifacts/result.json"))["total"] == 78.0


def test_an_exception_fails_the_job_with_its_traceback(settings):
    jid = submit(settings, steps=10, fail_at=3)
    assert run_job(jid, settings) == "failed"
    job = job_row(settings, jid)
    assert job.failure_code == "exception" and "asked to fail at step 3" in job.error


def test_a_second_attempt_resumes_from_the_last_checkpoint(settings, store):
    from workers import lifecycle

    jid = submit(settings, steps=12, checkpoint_every=5, fail_at=8)
    run_job(jid, settings)  # fails at step 8 after checkpointing step 5
    with session_scope(settings.database_url) as s:  # re-queue it as the reaper would after a crash
        s.query(Job).filter(Job.id == jid).update({"status": "running"})
        s.flush()
        lifecycle.release_lost(s, s.get(Job, jid), "test")
        s.get(Job, jid).params = {"steps": 12, "checkpoint_every": 5}
    assert run_job(jid, settings, attempt=2) == "succeeded"
    result = json.loads(store.get_bytes(f"jobs/{jid}/artifacts/result.json"))
    assert result == {"total": 78.0, "resumed_from": 5}


def test_a_claimed_or_cancelled_job_is_skipped(settings):
    jid = submit(settings, steps=3)
    with session_scope(settings.database_url) as s:
        from workers import lifecycle

        lifecycle.request_cancel(s, jid)
    assert run_job(jid, settings) == "skipped"
