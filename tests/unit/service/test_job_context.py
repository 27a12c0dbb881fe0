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


def test_an_attempt_sweeps_checkpoint_objects_no_row_names_but_never_a_later_attempts(settings, store):
    """bench/chaos.py found checkpoint objects with no row after workers were killed between an upload and
    its row (or between a pruned row and its object's delete). The attempt that ends sweeps them; the
    objects of an attempt that took over meanwhile are left alone."""
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", params={})
        s.add(job)
        s.flush()
        assert lifecycle.claim(s, job.id, 1, "w1", 30)
        assert lifecycle.release_lost(s, s.get(Job, job.id), "killed") == "queued"
        assert lifecycle.claim(s, job.id, 2, "w2", 30)
        s.refresh(job)
        s.expunge(job)
    prefix = f"jobs/{job.id}/checkpoints/"
    killed_mid_write = store.put_bytes(f"{prefix}step-000000005-a1.safetensors", b"attempt 1 died here").key
    later = store.put_bytes(f"{prefix}step-000000009-a3.safetensors", b"a newer attempt's upload").key
    ctx = JobRunContext(job, None, settings, store, "cpu")
    ctx.start()
    ctx.save_checkpoint({"w": torch.ones(2)}, 8)
    ctx.close()
    assert killed_mid_write not in store.list(prefix)
    with session_scope(settings.database_url) as s:
        named = set(s.scalars(select(Artifact.key).where(Artifact.job_id == job.id)))
    assert set(store.list(prefix)) == named | {later}


def test_a_store_outage_while_pruning_does_not_fail_the_job(ctx, settings, store, monkeypatch):
    """The old checkpoint's row is already gone: its object is swept later instead of failing the job."""
    for step in (1, 2):
        ctx.save_checkpoint({"w": torch.ones(2)}, step)

    def down(key: str) -> None:
        raise ConnectionError("S3 gateway down")

    monkeypatch.setattr(store, "delete", down)
    ctx.save_checkpoint({"w": torch.ones(2)}, 3)  # prunes step 1: its delete fails, the job goes on
    monkeypatch.undo()
    assert len(store.list(f"jobs/{ctx.job_id}/checkpoints/")) == 3
    assert ctx.sweep_checkpoints() == [f"jobs/{ctx.job_id}/checkpoints/step-000000001-a1.safetensors"]
    assert ctx.load_checkpoint().step == 3


def running_context(settings, store) -> JobRunContext:
    with session_scope(settings.database_url) as s:
        job = Job(method="test-counter", params={})
        s.add(job)
        s.flush()
        assert lifecycle.claim(s, job.id, 1, "w", 30)
        s.expunge(job)
    return JobRunContext(job, None, settings, store, "cpu")


def model_files_intact(settings, store, ref: str) -> bool:
    from workers.tables import RegisteredModel

    name, _, version = ref.partition("@")
    with session_scope(settings.database_url) as s:
        row = s.scalars(
            select(RegisteredModel).where(RegisteredModel.name == name, RegisteredModel.version == int(version))
        ).one()
    return all(
        hashlib.sha256(store.get_bytes(f"{row.key}/{rel}")).hexdigest() == info["sha256"]
        for rel, info in row.files.items()
    )


def test_two_jobs_registering_the_same_next_version_keep_each_others_files(settings, store, tmp_path, monkeypatch):
    """Both read max(version) + 1 = 1; the first inserts its row while the second uploads. The second used to
    write over the first's files at the same key, then, on losing the insert, delete that prefix: the first's
    registered model lost its files (a registered-model check of bench/chaos.py)."""
    first, second = running_context(settings, store), running_context(settings, store)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weights.txt").write_text("first job's weights")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "weights.txt").write_text("second job's weights")
    refs = []
    real_put = store.put_file

    def put_file(key, path):
        if not refs and path.read_text() == "second job's weights":
            refs.append(first.register_model("counter", tmp_path / "a"))  # the first wins version 1 meanwhile
        return real_put(key, path)

    monkeypatch.setattr(store, "put_file", put_file)
    assert second.register_model("counter", tmp_path / "b") == "counter@2"
    assert refs == ["counter@1"]
    assert model_files_intact(settings, store, "counter@1") and model_files_intact(settings, store, "counter@2")
    assert all(k.count("/") == 5 for k in store.list("models/default/counter/"))  # nothing left of the lost try


def test_a_fenced_off_registration_leaves_no_files(ctx, settings, store, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.txt").write_text("late")
    with session_scope(settings.database_url) as s:
        lifecycle.release_lost(s, s.get(Job, ctx.job_id), "worker lost")
    with pytest.raises(lifecycle.StaleAttempt):
        ctx.register_model("counter", tmp_path / "m")
    assert store.list("models/") == []


def test_an_attempt_that_reruns_the_end_of_a_job_gets_the_model_an_earlier_attempt_registered(
    settings, store, tmp_path
):
    """bench/chaos.py: attempt 1 registered its model, then its Ray driver died before the job's final state;
    attempt 2 resumed from the last checkpoint, ran to the end and registered a second version. A job's
    registrations are once per job: the n-th registration of a name matches the job's n-th version."""
    from workers.tables import RegisteredModel

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.txt").write_text("trained")
    first = running_context(settings, store)
    assert first.register_model("counter", tmp_path / "m") == "counter@1"
    with session_scope(settings.database_url) as s:
        assert lifecycle.release_lost(s, s.get(Job, first.job_id), "driver gone", job_at_fault=False) == "queued"
        assert lifecycle.claim(s, first.job_id, 2, "w2", 30)
        job = s.get(Job, first.job_id)
        s.refresh(job)
        s.expunge(job)
    second = JobRunContext(job, None, settings, store, "cpu")
    assert second.register_model("counter", tmp_path / "m") == "counter@1"
    assert second.register_model("counter", tmp_path / "m") == "counter@2"  # a second one of this run is new
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(RegisteredModel)) == 2
    assert model_files_intact(settings, store, "counter@1")
