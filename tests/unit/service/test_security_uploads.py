"""Attacks through what users upload: paths, archives, pickles, dataset files, model folders.

Archives and datasets are hostile until checked: names that escape, links, bombs (counted as bytes
stream out, and for datasets from the `.npy` headers before anything is decoded), more entries than
allowed (counted while reading, folders included), quotas charged on the decompressed bytes, malformed
safetensors, and error bodies that would tell a client where the server keeps its state.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.conftest import make_key, make_settings
from tests.unit.service.attacks import as_key, client_for, model_folder_zip, tar_gz_of, zip_of
from tests.unit.service.test_api import npz, problem
from workers.db import session_scope, upgrade
from workers.tables import DatasetRow, RegisteredModel


@pytest.fixture
def app(settings):
    with TestClient(create_app(settings, run_executor=False)) as client:
        yield client


# -- paths, archives and pickles ---------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/secret", "a/../../b", "/etc/passwd", "a\\..\\b"]
)
def test_artifact_path_traversal_is_refused(app, settings, name):
    as_key(app, make_key(settings))
    job = app.post("/api/v1/jobs", json={"method": "test-counter"}).json()
    r = app.get(f"/api/v1/jobs/{job['id']}/artifacts/{name}")
    assert r.status_code in (400, 404), r.status_code
    problem(r, r.status_code)


def test_dataset_routes_refuse_traversal_names(app, settings):
    as_key(app, make_key(settings))
    for name in ("..", "../secret", ".hidden", "UPPER", "a" * 80):
        r = app.post(
            "/api/v1/datasets",
            data={"name": name, "kind": "tabular"},
            files={"file": ("x.npz", npz(x_train=np.zeros((4, 2), np.float32), y_train=np.arange(4) % 2))},
        )
        problem(r, 422, "/name")
    assert app.get("/api/v1/datasets/..%2F..%2Fetc").status_code == 404


def test_zip_slip_archive_is_refused_and_writes_nothing_outside(app, settings, tmp_path):
    as_key(app, make_key(settings))
    evil = zip_of({"config.json": b"{}", "../../escaped.json": b"{}", "model.safetensors": b""})
    body = problem(app.post("/api/v1/models", data={"name": "evil"}, files={"file": ("m.zip", evil)}), 422, "/file")
    assert "outside" in body["detail"]
    assert not list(settings.home.parent.rglob("escaped.json"))
    absolute = zip_of({"/tmp/abs-escape.json": b"{}"})
    problem(app.post("/api/v1/models", data={"name": "evil"}, files={"file": ("m.zip", absolute)}), 422)
    assert not Path("/tmp/abs-escape.json").exists()


def test_symlink_in_a_tar_archive_is_refused(app, settings):
    as_key(app, make_key(settings))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    body = problem(app.post("/api/v1/models", data={"name": "evil"}, files={"file": ("m.tar.gz", buf.getvalue())}), 422)
    assert "link" in body["detail"]


def test_zip_bomb_is_stopped_by_the_decompressed_size(tmp_path):
    s = make_settings(tmp_path / "h", max_upload_bytes=64 * 1024)
    upgrade(s.database_url)
    bomb = zip_of({"config.json": b"{}", "model.safetensors": b"\0" * (8 * 1024 * 1024)})  # 8 MiB → ~8 KiB
    assert len(bomb) < 64 * 1024
    with TestClient(create_app(s, run_executor=False)) as client:
        as_key(client, make_key(s))
        body = problem(client.post("/api/v1/models", data={"name": "bomb"}, files={"file": ("b.zip", bomb)}), 413)
        assert "bytes" in body["detail"]


class _Boom:
    """Unpickling this would create a file: proof of code execution if it ever happened."""

    marker: Path

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.marker,))


def test_a_pickle_bearing_checkpoint_is_refused_without_running_it(app, settings, tmp_path):
    as_key(app, make_key(settings))
    marker = tmp_path / "pwned"
    boom = _Boom()
    boom.marker = marker
    payload = pickle.dumps(boom)
    for name in ("pytorch_model.bin", "model.pt", "weights.pkl", "ckpt.ckpt"):
        r = app.post(
            "/api/v1/models",
            data={"name": "pickled"},
            files={"file": ("m.zip", zip_of({"config.json": b"{}", name: payload}))},
        )
        body = problem(r, 415)
        assert "pickle" in body["detail"] and "safetensors" in body["detail"]
    # the same bytes as a job checkpoint are refused by the checkpoint reader, which never unpickles
    from models.checkpoint import CheckpointFormatError, decode_checkpoint

    with pytest.raises(CheckpointFormatError):
        decode_checkpoint(payload)
    assert not marker.exists()


def test_a_clean_model_folder_imports_with_its_manifest(app, settings):
    as_key(app, make_key(settings))
    r = app.post("/api/v1/models", data={"name": "tiny"}, files={"file": ("m.zip", model_folder_zip())})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["ref"] == "tiny@1" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(out["files"])
    assert out["config"]["format"] == "transformers"
    no_weights = zip_of({"config.json": b"{}", "README.md": b"hi"})
    problem(app.post("/api/v1/models", data={"name": "tiny"}, files={"file": ("m.zip", no_weights)}), 422, "/file")
    problem(app.post("/api/v1/models", data={"name": "tiny"}, files={"file": ("m.zip", b"not an archive")}), 415)


# -- archive entries are counted as they are read, folders included (item 1) ------------------------
def test_every_archive_entry_counts_while_the_archive_is_read(tmp_path, monkeypatch):
    """A small .tar.gz of thousands of folder entries stops at CRUCIBLE_MAX_ARCHIVE_FILES, read no further."""
    headers_read = []
    real_next = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: headers_read.append(1) or real_next(self))
    folders = tar_gz_of({f"d{i}/": None for i in range(5000)} | {"config.json": b"{}"})
    assert len(folders) < 64 * 1024
    with client_for(make_settings(tmp_path / "h", max_archive_files=50)) as client:
        body = problem(client.post("/api/v1/models", data={"name": "dirs"}, files={"file": ("d.tar.gz", folders)}), 413)
        assert "MAX_ARCHIVE_FILES" in body["detail"] and "folders" in body["detail"]
    assert len(headers_read) <= 52  # the 51st entry ended the reading, not the 5001st


def test_a_zip_declaring_too_many_entries_is_refused_before_its_directory_is_read(tmp_path, monkeypatch):
    import zipfile

    directories_read = []
    real = zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: directories_read.append(1) or real(self))
    folders = zip_of({f"d{i}/": b"" for i in range(500)})
    with client_for(make_settings(tmp_path / "h", max_archive_files=50)) as client:
        directories_read.clear()
        r = client.post("/api/v1/models", data={"name": "dirs"}, files={"file": ("d.zip", folders)})
        assert "MAX_ARCHIVE_FILES" in problem(r, 413)["detail"]
    assert directories_read == []


def test_a_name_that_is_both_a_file_and_a_folder_is_422(app, settings):
    as_key(app, make_key(settings))
    clash = zip_of({"config.json": b"{}", "x.json": b"{}", "x.json/y.json": b"{}", "model.safetensors": b""})
    body = problem(app.post("/api/v1/models", data={"name": "clash"}, files={"file": ("c.zip", clash)}), 422, "/file")
    assert "x.json" in body["detail"]


@pytest.mark.parametrize(
    "weights",
    [
        struct.pack("<Q", 1 << 40) + b"{}",  # a header length far past the file
        struct.pack("<Q", 2) + b"{]",  # a header that is not JSON
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
        ),  # offsets past the data
    ],
)
def test_malformed_safetensors_are_refused_at_import(app, settings, weights):
    as_key(app, make_key(settings))
    archive = zip_of({"config.json": b'{"architectures": ["LlamaForCausalLM"]}', "model.safetensors": weights})
    body = problem(app.post("/api/v1/models", data={"name": "bad"}, files={"file": ("b.zip", archive)}), 422, "/file")
    assert "safetensors" in body["detail"]
    assert app.get("/api/v1/models").json()["items"] == []


# -- the storage quota is charged the decompressed bytes (item 4) ----------------------------------------
def test_the_quota_counts_an_archive_once_decompressed_and_refuses_before_storing(tmp_path):
    s = make_settings(tmp_path / "h", max_stored_bytes_per_project=1024 * 1024)
    expands = zip_of({"config.json": b"{}", "model.safetensors": b"\0" * (4 * 1024 * 1024)})
    assert len(expands) < 64 * 1024  # well under the quota as sent
    with client_for(s) as client:
        r = client.post("/api/v1/models", data={"name": "big"}, files={"file": ("b.zip", expands)})
        body = problem(r, 413)
        assert body["type"] == "/problems/storage-quota" and body["limit_bytes"] == 1024 * 1024
        assert "decompress" in body["detail"]
        assert client.get("/api/v1/whoami").json()["limits"]["stored_bytes"] == 0
    with session_scope(s.database_url) as session:
        assert session.query(RegisteredModel).count() == 0
    assert not list((s.home / "objects").rglob("*.safetensors"))


# -- dataset decompression bombs (item 2) -------------------------------------------------------------------
def test_a_compressed_npz_that_decodes_past_the_limit_is_refused_from_its_headers(tmp_path, monkeypatch):
    import workers.datasets

    parsed = []
    monkeypatch.setattr(workers.datasets, "parse_upload", lambda *a: parsed.append(a) or pytest.fail("decoded"))
    buf = io.BytesIO()
    np.savez_compressed(buf, x_train=np.zeros((200_000, 64)), y_train=np.zeros(200_000, np.int64))
    bomb = buf.getvalue()
    assert len(bomb) < 512 * 1024  # ~100 MB of float64 once decoded
    with client_for(make_settings(tmp_path / "h", max_dataset_bytes=16 * 1024 * 1024)) as client:
        r = client.post("/api/v1/datasets", data={"name": "bomb", "kind": "tabular"}, files={"file": ("b.npz", bomb)})
        body = problem(r, 413, "/file")
        assert "CRUCIBLE_MAX_DATASET_BYTES" in body["detail"] and "x_train" in body["detail"]
        assert body["limit_bytes"] == 16 * 1024 * 1024
        assert client.get("/api/v1/datasets/bomb").status_code == 404
    assert parsed == []


def test_npz_members_that_are_not_plain_arrays_are_refused_unread(app, settings):
    as_key(app, make_key(settings))
    junk = zip_of({"x_train.npy": b"\0" * 100_000, "y_train.npy": b"not an array"})
    r = app.post("/api/v1/datasets", data={"name": "junk", "kind": "tabular"}, files={"file": ("j.npz", junk)})
    problem(r, 422, "/file")
    objects = npz(x_train=np.array([object()] * 4, dtype=object), y_train=np.arange(4))
    r = app.post("/api/v1/datasets", data={"name": "obj", "kind": "tabular"}, files={"file": ("o.npz", objects)})
    problem(r, 422)


def test_a_jsonl_over_the_decoded_limit_is_413(tmp_path):
    lines = b"".join(json.dumps({"text": "word " * 20}).encode() + b"\n" for _ in range(2000))
    with client_for(make_settings(tmp_path / "h", max_dataset_bytes=64 * 1024)) as client:
        r = client.post(
            "/api/v1/datasets", data={"name": "txt", "kind": "text-corpus"}, files={"file": ("t.jsonl", lines)}
        )
        assert "CRUCIBLE_MAX_DATASET_BYTES" in problem(r, 413, "/file")["detail"]
        small = b'{"text": "a b c"}\n' * 10
        ok = client.post(
            "/api/v1/datasets", data={"name": "small", "kind": "text-corpus"}, files={"file": ("s.jsonl", small)}
        )
        assert ok.status_code == 201, ok.text
    with session_scope(make_settings(tmp_path / "h").database_url) as session:
        assert [r.name for r in session.query(DatasetRow)] == ["small"]


# -- error bodies never name a server path (item 12) -------------------------------------------------------
def test_error_bodies_never_name_a_server_path(app, settings):
    as_key(app, make_key(settings))
    # a diffusers folder with no unet/: the loader's error names the folder it cached the model in
    folder = model_folder_zip(top="", extra={"model_index.json": b'{"_class_name": "X"}'})
    assert app.post("/api/v1/models", data={"name": "pathleak"}, files={"file": ("m.zip", folder)}).status_code == 201
    r = app.post("/api/v1/deployments", json={"name": "leak", "model": "pathleak"})
    assert r.status_code == 422, r.text
    for secret in (str(settings.home), str(Path(settings.home).parent), "/cache/models/"):
        assert secret not in r.text, r.text
