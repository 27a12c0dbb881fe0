"""Resumable uploads: a model archive sent in parts, resumed after a broken connection, imported by its id."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from api.app import create_app
from api.auth import bootstrap_admin_key
from api.cli import main
from api.resumable import append_part, get_upload
from tests.conftest import make_key, make_settings
from tests.unit.causal_folders import tiny_causal_folder
from tests.unit.service.attacks import live_server
from tests.unit.service.test_api import problem
from tests.unit.service.test_own_models import tar_dot
from workers.db import session_scope, upgrade
from workers.storage import open_store
from workers.tables import Upload, utcnow


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    return tar_dot(tiny_causal_folder(tmp_path_factory.mktemp("up") / "llama", "llama"))


def start(api, blob: bytes, **extra) -> dict:
    body = {"filename": "m.tar.gz", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **extra}
    r = api.post("/api/v1/uploads", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def send(api, upload_id: str, offset: int, part: bytes):
    return api.patch(
        f"/api/v1/uploads/{upload_id}",
        content=part,
        headers={"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
    )


def stored_parts(settings) -> list[str]:
    return open_store(settings.storage_url, None, "us-east-1").list("uploads/")


def test_an_archive_sent_in_parts_resumes_at_the_servers_offset_and_imports_by_id(api, settings, archive):
    up = start(api, archive)
    assert up["offset"] == 0 and not up["complete"] and up["part_bytes"] == settings.upload_part_bytes
    third = len(archive) // 3
    r = send(api, up["id"], 0, archive[:third])
    assert r.status_code == 200 and r.json()["offset"] == third and r.headers["Upload-Offset"] == str(third)

    # the answer was "lost" and the client sends the same part again: told where the server is, nothing appended
    body = problem(send(api, up["id"], 0, archive[:third]), 409)
    assert body["offset"] == third and "send the part that starts at" in body["detail"]
    status = api.get(f"/api/v1/uploads/{up['id']}")
    assert status.json()["offset"] == third and status.headers["Upload-Offset"] == str(third)

    # used before it is finished: 409 saying how much is missing
    early = problem(api.post("/api/v1/models", data={"name": "parts", "upload": up["id"]}), 409, "/upload")
    assert f"{third} of its {len(archive)} bytes" in early["detail"]

    assert send(api, up["id"], third, archive[third : 2 * third]).json()["offset"] == 2 * third
    done = send(api, up["id"], 2 * third, archive[2 * third :]).json()
    assert done["offset"] == len(archive) and done["complete"]
    assert stored_parts(settings)

    out = api.post("/api/v1/models", data={"name": "parts", "upload": up["id"]})
    assert out.status_code == 201, out.text
    assert out.json()["ref"] == "parts@1" and "model.safetensors" in out.json()["files"]
    problem(api.get(f"/api/v1/uploads/{up['id']}"), 404, "/upload")  # used once, then gone with its parts
    assert stored_parts(settings) == []
    events = api.get("/api/v1/audit").json()["items"]
    assert {"upload.create", "model.import"} <= {e["action"] for e in events}


def test_what_could_never_be_used_is_refused_before_a_byte_is_sent(api, settings, archive):
    body = problem(api.post("/api/v1/uploads", json={"filename": "m.zip", "size": settings.max_upload_bytes + 1}), 413)
    assert "CRUCIBLE_MAX_UPLOAD_BYTES" in body["detail"]
    problem(api.post("/api/v1/uploads", json={"filename": "m.zip", "size": 10, "sha256": "xyz"}), 422, "/sha256")

    up = start(api, archive)
    body = problem(send(api, up["id"], 0, archive + b"tail"), 413, "/body")  # past the declared size
    assert f"declared as {len(archive)} bytes" in body["detail"]
    problem(send(api, up["id"], 0, b""), 422, "/body")
    body = problem(api.patch(f"/api/v1/uploads/{up['id']}", content=b"x"), 422, "/Upload-Offset")
    assert "for the next part" in body["detail"]

    # the file must be named one way: a file or an upload, not both, not neither
    problem(api.post("/api/v1/models", data={"name": "both", "upload": up["id"]}, files={"file": ("m.zip", b"x")}), 422)
    problem(api.post("/api/v1/models", data={"name": "neither"}), 422, "/file")
    problem(api.post("/api/v1/models", data={"name": "nope", "upload": "01HZZZZZZZZZZZZZZZZZZZZZZZ"}), 404, "/upload")

    # bytes that do not hash to the declared sha256 are refused at use, and nothing is registered
    bad = start(api, archive)
    corrupted = bytes([archive[0] ^ 1]) + archive[1:]
    assert send(api, bad["id"], 0, corrupted).json()["complete"]
    body = problem(api.post("/api/v1/models", data={"name": "bad", "upload": bad["id"]}), 422, "/upload")
    assert "corrupted on the way" in body["detail"]
    assert api.get("/api/v1/models").json()["items"] == []

    assert api.delete(f"/api/v1/uploads/{bad['id']}").status_code == 204
    problem(api.get(f"/api/v1/uploads/{bad['id']}"), 404)


def test_uploads_belong_to_a_project_expire_and_are_capped(api, settings, archive):
    up = start(api, archive)
    other = TestClient(api.app)
    other.headers["Authorization"] = f"Bearer {make_key(settings, project='elsewhere')}"
    problem(other.get(f"/api/v1/uploads/{up['id']}"), 404)
    problem(send(other, up["id"], 0, archive[:10]), 404)

    assert send(api, up["id"], 0, archive[:100]).status_code == 200
    with session_scope(settings.database_url) as s:
        s.get(Upload, up["id"]).expires_at = utcnow() - timedelta(seconds=1)
    problem(api.get(f"/api/v1/uploads/{up['id']}"), 404)
    assert stored_parts(settings) == []  # an expired upload is swept with its parts

    opened = [start(api, archive)["id"] for _ in range(settings.max_open_uploads_per_project)]
    body = problem(api.post("/api/v1/uploads", json={"filename": "m.zip", "size": 10}), 409)
    assert "unfinished uploads" in body["detail"]
    api.delete(f"/api/v1/uploads/{opened[0]}")
    assert api.post("/api/v1/uploads", json={"filename": "m.zip", "size": 10}).status_code == 201


def test_a_part_over_the_part_cap_is_refused(tmp_path, archive):
    settings = make_settings(tmp_path / "home", upload_part_bytes=4096)
    upgrade(settings.database_url)
    with TestClient(create_app(settings, run_executor=False)) as api:
        api.headers["Authorization"] = f"Bearer {make_key(settings)}"
        up = start(api, archive)
        assert up["part_bytes"] == 4096
        body = problem(send(api, up["id"], 0, archive[:5000]), 413)
        assert "CRUCIBLE_UPLOAD_PART_BYTES" in body["detail"] or "smaller parts" in body["detail"]
        assert send(api, up["id"], 0, archive[:4096]).json()["offset"] == 4096


def test_two_clients_racing_at_one_offset_append_once(api, settings, archive):
    up = start(api, archive)
    store = open_store(settings.storage_url, None, "us-east-1")
    with session_scope(settings.database_url) as first, session_scope(settings.database_url) as second:
        a, b = get_upload(first, store, "default", up["id"]), get_upload(second, store, "default", up["id"])
        assert append_part(first, store, a, 0, io.BytesIO(archive[:64]), 64) == 64
        with pytest.raises(Exception) as lost:
            append_part(second, store, b, 0, io.BytesIO(archive[64:128]), 64)  # read offset 0, lost the race
        assert getattr(lost.value, "status", None) == 409
    with session_scope(settings.database_url) as s:
        row = s.get(Upload, up["id"])
        assert row.offset == 64 and len(row.parts) == 1
    assert len(stored_parts(settings)) == 1  # the loser's part object is gone


@pytest.fixture
def small_parts_server(tmp_path, monkeypatch) -> Iterator[tuple]:
    settings = make_settings(tmp_path / "home", upload_part_bytes=16 * 1024)
    upgrade(settings.database_url)
    key = bootstrap_admin_key(settings)
    with live_server(create_app(settings, run_executor=False)) as port:
        monkeypatch.setenv("CRUCIBLE_API_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("CRUCIBLE_API_KEY", key)
        yield settings, port


def test_the_cli_resumes_an_upload_whose_connection_broke(small_parts_server, tmp_path, monkeypatch):
    settings, _ = small_parts_server
    folder = tiny_causal_folder(tmp_path / "gpt2", "gpt2")
    real_patch, calls = httpx.Client.patch, []

    def flaky_patch(self, url, **kw):
        calls.append(kw["headers"]["Upload-Offset"])
        if len(calls) == 2:  # the part reaches the server, its answer is lost
            real_patch(self, url, **kw)
            raise httpx.ReadTimeout("the answer was lost")
        if len(calls) == 4:  # the connection drops before the part is sent
            raise httpx.ConnectError("connection reset")
        return real_patch(self, url, **kw)

    monkeypatch.setattr(httpx.Client, "patch", flaky_patch)
    monkeypatch.setattr("time.sleep", lambda s: None)
    out = CliRunner().invoke(main, ["models", "upload", "gpt2", str(folder)])
    assert out.exit_code == 0 and "registered gpt2@1" in out.stdout, out.output
    assert "resuming" in out.stderr and len(calls) > 4
    assert len(set(calls)) == len(calls) - 1  # only the part lost before sending went twice
    got = tmp_path / "back"
    assert CliRunner().invoke(main, ["models", "download", "gpt2@1", "--extract", str(got)]).exit_code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(got / "gpt2-1")
    original = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert (a == b).all(), name
    assert stored_parts(settings) == []
    assert Path(settings.home).exists()


def test_two_imports_of_one_name_at_once_get_two_whole_versions(settings, archive):
    """Both read the same next version; the loser takes the next one, and neither's files are overwritten or
    deleted by the other."""
    import threading

    from api.model_imports import import_model
    from workers.tables import RegisteredModel

    store = open_store(settings.storage_url, None, "us-east-1")
    both_picked = threading.Barrier(2, timeout=30)
    real_put, first_put = store.put_file, set()

    def put_after_both_picked(key, path):
        if threading.get_ident() not in first_put:
            first_put.add(threading.get_ident())
            both_picked.wait()  # both imports have read max(version) before either registers
        return real_put(key, path)

    store.put_file = put_after_both_picked  # type: ignore[method-assign]
    with session_scope(settings.database_url) as s:  # the project row exists before the imports race
        from workers.tables import Project

        if s.get(Project, "default") is None:
            s.add(Project(name="default"))
    versions, failures = [], []

    def one_import() -> None:
        try:
            with session_scope(settings.database_url) as s:
                versions.append(import_model(s, store, settings, "default", "raced", io.BytesIO(archive)).version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=one_import) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert sorted(versions) == [1, 2]
    with session_scope(settings.database_url) as s:
        rows = s.query(RegisteredModel).filter_by(name="raced").all()
        for row in rows:
            for rel, meta in row.files.items():
                blob = store.get_bytes(f"{row.key}/{rel}")
                assert hashlib.sha256(blob).hexdigest() == meta["sha256"], (row.version, rel)


def test_a_dataset_sent_in_parts_is_uploaded_by_id(api, settings):
    lines = b"".join(b'{"text": "def f(x):\\n    return x + %d\\n"}\n' % i for i in range(50))
    up = start(api, lines, filename="code.jsonl")
    half = len(lines) // 2
    assert send(api, up["id"], 0, lines[:half]).status_code == 200
    assert send(api, up["id"], half, lines[half:]).json()["complete"]
    r = api.post("/api/v1/datasets", data={"name": "parted", "kind": "text-corpus", "upload": up["id"]})
    assert r.status_code == 201, r.text
    problem(api.get(f"/api/v1/uploads/{up['id']}"), 404)
    wrong = start(api, lines, filename="code.csv")
    assert send(api, wrong["id"], 0, lines).json()["complete"]
    problem(api.post("/api/v1/datasets", data={"name": "csv", "kind": "text-corpus", "upload": wrong["id"]}), 415)
    problem(api.post("/api/v1/datasets", data={"name": "none", "kind": "text-corpus"}), 422, "/file")
