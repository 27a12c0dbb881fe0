"""run_job in this process: final states, failure reasons, resume from the last checkpoint."""

import json
import threading

import pytest

from tests.conftest import wait_for
from workers import lifecycle
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


@pytest.mark.parametrize("cancel_with", ["cancelled", "interrupted"])
def test_a_cancelled_run_ends_cancelled_however_the_method_stops(settings, cancel_with):
    """A method that stops on cancel by raising `Cancelled` or a bare `InterruptedError` (as diffusion training,
    ict, apg, hydra … do) ends `cancelled`, never `failed` with the exception as its reason."""
    jid = submit(settings, steps=2000, step_seconds=0.05, cancel_with=cancel_with)

    def cancel_once_it_runs() -> None:
        wait_for(lambda: job_row(settings, jid).progress_done >= 2, timeout=120)
        with session_scope(settings.database_url) as s:
            assert lifecycle.request_cancel(s, jid) == "cancelling"

    canceller = threading.Thread(target=cancel_once_it_runs)
    canceller.start()
    try:
        assert run_job(jid, settings) == "cancelled"
    finally:
        canceller.join()
    job = job_row(settings, jid)
    assert job.status == "cancelled" and job.failure_code == "cancelled" and job.error is None
    assert job.progress_done < 2000


def test_a_job_log_holds_no_third_party_noise(settings):
    """A job process that imports what real methods import (diffusers, peft: torchao's and bitsandbytes' kernel
    warnings, torch's pytree notes) and runs a library's tqdm bar logs only what the job itself printed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from api.jobs import read_log

    jid = submit(settings, steps=3, noisy_imports=True)
    env = {**os.environ, **settings.to_env()}
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # as a worker started outside this test
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "workers.run_job", jid, "--attempt", "1"],
        cwd=Path(__file__).resolve().parents[3],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with session_scope(settings.database_url) as s:
        text, _, _ = read_log(s, jid, 0, 1 << 20)
    assert "counter starting at step 0" in text
    for noise in ("torchao", "Failed to load", "_pytree", "kernels-community", "progress bar", "\r"):
        assert noise not in text, (noise, text)


def test_a_job_log_shows_its_metrics_as_readable_lines(settings):
    """Methods log metrics, not prose: the log still gets a line of the latest ones, throttled by time."""
    from api.jobs import read_log

    jid = submit(settings, steps=5)
    assert run_job(jid, settings.model_copy(update={"log_line_every_s": 1e-9})) == "succeeded"
    with session_scope(settings.database_url) as s:
        text, _, _ = read_log(s, jid, 0, 1 << 20)
    assert "[step 1] value 1\n" in text and "[step 5] value 15\n" in text, text

    quiet = submit(settings, steps=5)
    assert run_job(quiet, settings.model_copy(update={"log_line_every_s": 0})) == "succeeded"
    with session_scope(settings.database_url) as s:
        text, _, _ = read_log(s, quiet, 0, 1 << 20)
    assert "[step" not in text
