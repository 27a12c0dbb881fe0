"""Keys, roles, project isolation, abuse limits, the audit log, and the attacks the issue names.

Every route of the app is enumerated from the app itself, so a route added later without
authentication or project scoping fails here rather than in an incident report.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.auth import SESSION_COOKIE, bootstrap_admin_key, hash_key
from tests.conftest import make_key, make_settings
from tests.unit.service.test_api import npz, problem
from workers.db import session_scope, upgrade
from workers.tables import ApiKey, AuditEvent, Job, RegisteredModel

PUBLIC = {
    "/api/v1/health",
    "/",
    "/login",
    "/logout",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/vendor/plotly.min.js",
}


def app_routes(app) -> list[tuple[str, str]]:
    """Every documented (method, path) of the app, from its OpenAPI document."""
    return sorted((m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops)


def fill(path: str, **values: str) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: values.get(m.group(1), "x"), path)


@pytest.fixture
def app(settings):
    with TestClient(create_app(settings, run_executor=False)) as client:
        yield client


def as_key(client: TestClient, key: str) -> TestClient:
    client.headers["Authorization"] = f"Bearer {key}"
    return client


def model_folder_zip(extra: dict[str, bytes] | None = None, top: str = "tiny") -> bytes:
    import torch
    from safetensors.torch import save

    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "model.safetensors": save({"w": torch.zeros(2)}),
        **(extra or {}),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{top}/{name}" if top else name, data)
    return buf.getvalue()


# -- authentication ------------------------------------------------------------
def test_every_route_but_health_docs_and_login_needs_a_key(app):
    closed = [(m, p) for m, p in app_routes(app.app) if p not in PUBLIC]
    assert len(closed) >= 20
    for method, path in closed:
        r = app.request(method, fill(path))
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        problem(r, 401)
    assert app.get("/api/v1/health").status_code == 200
    assert app.get("/openapi.json").status_code == 200


def test_wrong_scheme_unknown_and_revoked_keys_are_refused(app, settings):
    key = make_key(settings, role="admin")
    assert app.get("/api/v1/jobs", headers={"Authorization": f"Basic {key}"}).status_code == 401
    assert app.get("/api/v1/jobs", headers={"Authorization": "Bearer cru_" + "x" * 43}).status_code == 401
    as_key(app, key)
    other = app.post("/api/v1/keys", json={"role": "member", "name": "ci"}).json()
    assert app.get("/api/v1/jobs", headers={"Authorization": f"Bearer {other['key']}"}).status_code == 200
    assert app.delete(f"/api/v1/keys/{other['id']}").json()["revoked_at"]
    problem(app.get("/api/v1/jobs", headers={"Authorization": f"Bearer {other['key']}"}), 401)


def test_keys_are_stored_only_as_hashes_and_shown_once(app, settings):
    as_key(app, make_key(settings))
    created = app.post("/api/v1/keys", json={"role": "viewer"}).json()
    assert created["key"].startswith("cru_") and len(created["key"]) > 40
    listed = {k["id"]: k for k in app.get("/api/v1/keys").json()["items"]}
    assert listed[created["id"]]["key"] is None and listed[created["id"]]["prefix"] == created["key"][:10]
    with session_scope(settings.database_url) as s:
        row = s.get(ApiKey, created["id"])
        assert row.hash == hash_key(created["key"]) and created["key"] not in (row.hash, row.prefix, row.name)


def test_roles_viewer_reads_member_writes_admin_manages(app, settings):
    viewer, member = make_key(settings, role="viewer"), make_key(settings, role="member")
    as_key(app, viewer)
    assert app.get("/api/v1/jobs").status_code == 200
    problem(app.post("/api/v1/jobs", json={"method": "test-counter"}), 403)
    as_key(app, member)
    job = app.post("/api/v1/jobs", json={"method": "test-counter"}).json()
    assert app.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    for method, path in (
        ("GET", "/api/v1/keys"),
        ("POST", "/api/v1/keys"),
        ("GET", "/api/v1/audit"),
        ("POST", "/api/v1/projects"),
        ("GET", "/metrics"),
    ):
        problem(app.request(method, path, json={"role": "admin"} if method == "POST" else None), 403)


# -- isolation -----------------------------------------------------------------
def test_project_b_cannot_see_or_touch_anything_of_project_a(app, settings):
    """Every route with an id in its path answers 404 to another project's key, as for a missing id."""
    key_a = make_key(settings, project="alpha")
    as_key(app, key_a)
    job = app.post("/api/v1/jobs", json={"method": "test-counter"}).json()
    app.post(f"/api/v1/jobs/{job['id']}/cancel")
    up = app.post(
        "/api/v1/datasets",
        data={"name": "secret-set", "kind": "tabular"},
        files={"file": ("s.npz", npz(x_train=np.zeros((8, 3), np.float32), y_train=np.arange(8) % 2))},
    )
    assert up.status_code == 201, up.text
    model = app.post("/api/v1/models", data={"name": "secret-model"}, files={"file": ("m.zip", model_folder_zip())})
    assert model.status_code == 201, model.text
    key_a_row = app.post("/api/v1/keys", json={"role": "viewer"}).json()

    as_key(app, make_key(settings, project="beta"))
    values = {"job_id": job["id"], "name": "secret-set", "key_id": key_a_row["id"], "method_id": "test-counter"}
    probed = 0
    for method, path in app_routes(app.app):
        if "{" not in path or path.startswith("/api/v1/methods"):
            continue
        if path.startswith("/api/v1/models"):
            values["name"] = "secret-model"
        elif path.startswith("/api/v1/datasets"):
            values["name"] = "secret-set"
        r = app.request(method, fill(path, **values), json={} if method in ("POST", "PUT", "PATCH") else None)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        probed += 1
    assert probed >= 10
    assert app.get("/api/v1/jobs").json()["items"] == []
    assert "secret-set" not in {d["name"] for d in app.get("/api/v1/datasets").json()["items"]}
    assert app.get("/api/v1/models").json()["items"] == []
    # an idempotency key of project A names nothing in project B
    body = {"method": "test-counter"}
    as_key(app, key_a)
    first = app.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "run-1"}).json()
    as_key(app, make_key(settings, project="beta"))
    second = app.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "run-1"})
    assert second.status_code == 201 and second.json()["id"] != first["id"]


def test_a_job_registers_models_in_its_own_project(settings, store):
    from workers.context import JobRunContext, resolve_model

    with session_scope(settings.database_url) as s:
        from api.auth import create_project

        create_project(s, "gamma")
        job = Job(method="test-counter", project="gamma", status="running")
        s.add(job)
        s.flush()
        s.expunge(job)
    folder = settings.home / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    ctx = JobRunContext(job, None, settings, store, "cpu")
    assert ctx.register_model("tiny", folder) == "tiny@1"
    with session_scope(settings.database_url) as s:
        row = s.scalars(select(RegisteredModel)).one()
        assert row.project == "gamma" and row.key.startswith("models/gamma/")
    assert (resolve_model("tiny", settings, store, "gamma") / "config.json").exists()
    with pytest.raises(KeyError):
        resolve_model("tiny", settings, store, "default")


# -- the embedded default: admin key file and login link -------------------------
def test_first_up_writes_an_owner_only_admin_key_and_reuses_it(settings):
    key = bootstrap_admin_key(settings)
    mode = stat.S_IMODE(os.stat(settings.admin_key_file).st_mode)
    assert mode == 0o600 and key.startswith("cru_")
    assert bootstrap_admin_key(settings) == key
    with session_scope(settings.database_url) as s:
        s.scalars(select(ApiKey).where(ApiKey.hash == hash_key(key))).one().revoked_at = __import__(
            "workers.tables", fromlist=["utcnow"]
        ).utcnow()
    fresh = bootstrap_admin_key(settings)
    assert fresh != key and settings.admin_key_file.read_text().strip() == fresh


def test_login_link_sets_an_httponly_cookie_and_leaves_the_address_bar(app, settings):
    key = make_key(settings, role="member")
    r = app.get(f"/?token={key}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert (
        f"{SESSION_COOKIE}=" in cookie
        and "HttpOnly" in cookie
        and "SameSite=strict" in cookie.replace("Strict", "strict")
    )
    assert app.get("/api/v1/jobs").status_code == 200  # the cookie now authenticates reads
    # a write riding the cookie without the dashboard's header is a cross-site request: refused
    problem(app.post("/api/v1/jobs", json={"method": "test-counter"}), 403)
    ok = app.post("/api/v1/jobs", json={"method": "test-counter"}, headers={"X-Crucible-Client": "dashboard"})
    assert ok.status_code == 201
    bad = app.get("/?token=cru_nope", follow_redirects=False)
    assert bad.headers["location"] == "/?login=failed" and SESSION_COOKIE not in bad.headers.get("set-cookie", "")


# -- abuse limits ----------------------------------------------------------------
def test_submission_rate_limit_answers_429_with_retry_after(tmp_path):
    s = make_settings(tmp_path / "h", rate_limit_submit_per_minute=3)
    upgrade(s.database_url)
    with TestClient(create_app(s, run_executor=False)) as client:
        as_key(client, make_key(s))
        codes = [client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code for _ in range(5)]
        assert codes[:3] == [201] * 3 and codes[3] == 429
        body = problem(client.post("/api/v1/jobs", json={"method": "test-counter"}), 429)
        assert body["limit_per_minute"] == 3 and "RATE_LIMIT" in body["detail"]
        assert int(client.post("/api/v1/jobs", json={"method": "test-counter"}).headers["Retry-After"]) >= 1
        as_key(client, make_key(s))  # the bucket is per key
        assert client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code == 201


def test_project_quotas_on_active_jobs_and_stored_bytes(tmp_path):
    s = make_settings(tmp_path / "h", max_active_jobs_per_project=2, max_stored_bytes_per_project=4096)
    upgrade(s.database_url)
    with TestClient(create_app(s, run_executor=False)) as client:
        as_key(client, make_key(s))
        ids = [client.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"] for _ in range(2)]
        body = problem(client.post("/api/v1/jobs", json={"method": "test-counter"}), 429)
        assert body["limit"] == 2
        client.post(f"/api/v1/jobs/{ids[0]}/cancel")
        assert client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code == 201
        big = npz(x_train=np.zeros((200, 8), np.float32), y_train=np.arange(200) % 2)
        body = problem(
            client.post("/api/v1/datasets", data={"name": "big", "kind": "tabular"}, files={"file": ("b.npz", big)}),
            413,
        )
        assert body["limit_bytes"] == 4096


# -- the audit log -----------------------------------------------------------------
def test_audit_log_records_who_did_what(app, settings):
    as_key(app, make_key(settings))
    job = app.post("/api/v1/jobs", json={"method": "test-counter"}).json()
    app.post(f"/api/v1/jobs/{job['id']}/cancel")
    app.post("/api/v1/keys", json={"role": "viewer", "name": "dash"})
    events = app.get("/api/v1/audit").json()["items"]
    actions = [e["action"] for e in events]
    assert actions[:3] == ["key.create", "job.cancel", "job.submit"]
    assert events[2]["target"] == job["id"] and events[2]["detail"]["method"] == "test-counter"
    assert all(e["key_id"] and e["request_id"] for e in events[:3])
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(AuditEvent).where(AuditEvent.action == "job.submit")).project == "default"


# -- attacks -------------------------------------------------------------------------
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


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


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
    assert out["ref"] == "tiny@1" and set(out["files"]) == {"config.json", "model.safetensors"}
    assert out["config"]["format"] == "transformers"
    no_weights = zip_of({"config.json": b"{}", "README.md": b"hi"})
    problem(app.post("/api/v1/models", data={"name": "tiny"}, files={"file": ("m.zip", no_weights)}), 422, "/file")
    problem(app.post("/api/v1/models", data={"name": "tiny"}, files={"file": ("m.zip", b"not an archive")}), 415)
