"""JobRunContext against a real SQLite database and local store: batching, fencing, checkpoints."""

import hashlib

import pytest
import torch
from sqlalchemy import func, select

from workers import lifecycle
from workers.context import JobRunContext
from workers.db import session_scope
from workers.tables import Artifact, Job, Metric


@pytest.fixture
def ctx(settings, store):
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", params={})
        s.add(job)
        s.flush()
        lifecycle.claim(s, job.id, 1, "test", 30)
        s.expunge(job)
    c = JobRunContext(job, None, settings, store, "cpu")
    yield c
    c._stop.set()


def count_metrics(settings, job_id):
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Metric).where(Metric.job_id == job_id))


def test_metrics_are_batched_and_replays_do_not_duplicate(ctx, settings):
    for step in range(1, 401):  # 800 points: under the 1,000-point flush threshold
        ctx.log(step, loss=1.0 / step, acc=step / 400)
    assert count_metrics(settings, ctx.job_id) == 0  # still buffered
    ctx.flush()
    assert count_metrics(settings, ctx.job_id) == 800
    for step in range(300, 401):  # a resumed attempt re-logs steps after its checkpoint
        ctx.log(step, loss=2.0)
    ctx.flush()
    assert count_metrics(settings, ctx.job_id) == 800
    with session_scope(settings.database_url) as s:
        assert (
            s.scalar(select(Metric.value).where(Metric.job_id == ctx.job_id, Metric.name == "loss", Metric.step == 350))
            == 2.0
        )


def test_a_fenced_off_attempt_writes_nothing_and_is_told_to_stop(ctx, settings):
    with session_scope(settings.database_url) as s:
        lifecycle.release_lost(s, s.get(Job, ctx.job_id), "simulated lost worker")
    ctx.log(1, loss=1.0)
    ctx.flush()
    assert count_metrics(settings, ctx.job_id) == 0
    assert ctx.lost and ctx.cancelled()
    with pytest.raises(lifecycle.StaleAttempt):
        ctx.save_artifact("x.txt", "late write")


def test_checkpoints_publish_after_upload_and_keep_the_latest(ctx, settings, store):
    for step in (10, 20, 30):
        ctx.save_checkpoint({"w": torch.full((3,), float(step)), "step_note": step}, step)
    latest = ctx.load_checkpoint()
    assert latest.step == 30 and torch.equal(latest.state["w"], torch.full((3,), 30.0))
    with session_scope(settings.database_url) as s:
        rows = s.scalars(select(Artifact).where(Artifact.job_id == ctx.job_id, Artifact.kind == "checkpoint")).all()
    assert sorted(r.step for r in rows) == [20, 30]  # keep_checkpoints=2; the oldest row and object are gone
    assert len(store.list(f"jobs/{ctx.job_id}/checkpoints/")) == 2
    for r in rows:
        assert hashlib.sha256(store.get_bytes(r.key)).hexdigest() == r.sha256


def test_a_tampered_checkpoint_is_detected(ctx, settings, store):
    ctx.save_checkpoint({"w": torch.ones(2)}, 1)
    key = store.list(f"jobs/{ctx.job_id}/checkpoints/")[0]
    store.put_bytes(key, store.get_bytes(key)[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        ctx.load_checkpoint()


def test_artifacts_folders_and_models(ctx, settings, tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\x01\x02")
    ctx.save_artifact("plots/curve.txt", "1,2,3", kind="text")
    ctx.save_artifact("export", folder, kind="model")
    with session_scope(settings.database_url) as s:
        names = sorted(s.scalars(select(Artifact.name).where(Artifact.job_id == ctx.job_id)))
    assert names == ["export/config.json", "export/sub/w.bin", "plots/curve.txt"]
    assert ctx.register_model("tiny", folder, {"d": 4}) == "tiny@1"
    assert ctx.register_model("tiny", folder, {"d": 8}) == "tiny@2"
    path = ctx.load_model("tiny@1")
    assert (path / "sub" / "w.bin").read_bytes() == b"\x01\x02"
    assert ctx.load_model("tiny").name == "2"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "%2e%2e/x", ""])
def test_artifact_names_that_escape_are_refused(ctx, name):
    from models.context import ArtifactNameError

    with pytest.raises(ArtifactNameError):
        ctx.save_artifact(name, b"x")


def test_local_model_folders_only_under_import_roots(ctx, tmp_path):
    with pytest.raises(PermissionError, match="import root"):
        ctx.load_model(str(tmp_path))


def test_a_checkpoint_waits_out_a_database_outage(settings, store, monkeypatch):
    """The checkpoint row is published once the database is back; nothing is lost or doubled."""
    import sqlalchemy.exc

    from workers import context as context_module
    from workers.context import JobRunContext
    from workers.db import session_scope
    from workers.tables import Artifact, Job

    monkeypatch.setattr(context_module, "DB_RETRY_WAITS_S", (0.01, 0.01, 0.01))
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", status="running", lease_owner="t")
        s.add(job)
        s.flush()
        s.expunge(job)
    ctx = JobRunContext(job, None, settings, store, "cpu")
    real = ctx._publish_checkpoint
    failures = iter([True, True, False])

    def flaky(*args):  # the first two attempts find the database gone
        if next(failures):
            raise sqlalchemy.exc.OperationalError("INSERT", {}, ConnectionRefusedError("db restarting"))
        return real(*args)

    monkeypatch.setattr(ctx, "_publish_checkpoint", flaky)
    ctx.save_checkpoint({"w": __import__("torch").ones(3)}, step=7)
    with session_scope(settings.database_url) as s:
        rows = s.query(Artifact).filter_by(job_id=job.id, kind="checkpoint").all()
    assert [r.step for r in rows] == [7]
    assert ctx.load_checkpoint().step == 7


def test_a_stale_attempt_is_not_retried_as_an_outage():
    from workers import lifecycle
    from workers.context import through_db_outage

    calls = []

    def fenced():
        calls.append(1)
        raise lifecycle.StaleAttempt("job moved on")

    with pytest.raises(lifecycle.StaleAttempt):
        through_db_outage(fenced)
    assert calls == [1]
