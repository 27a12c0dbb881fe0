"""Keys, roles (operator, admin, member, viewer), project isolation, login, rate limits, quotas, the audit log.

Every route of the app is enumerated from the app itself, so a route added later without
authentication or project scoping fails here rather than in an incident report. The attacks on uploads
are in `test_security_uploads.py`, those on the server's availability in `test_security_availability.py`.
"""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.auth import SESSION_COOKIE, bootstrap_admin_key, hash_key
from tests.conftest import make_key, make_settings
from tests.unit.service.attacks import as_key, model_folder_zip
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


OPERATOR_ONLY = ("/api/v1/projects/",)  # routes only the server's operator may call: 403 to everyone else


@pytest.fixture
def app(settings):
    with TestClient(create_app(settings, run_executor=False)) as client:
        yield client


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
    """Every route with an id in its path answers 404 to another project's key, as for a missing id
    (the operator's routes answer 403 to any other key, whatever the id)."""
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
    values = {
        "job_id": job["id"],
        "name": "secret-set",
        "key_id": key_a_row["id"],
        "method_id": "test-counter",
        "version": "1",
    }
    probed = 0
    for method, path in app_routes(app.app):
        if "{" not in path or path.startswith("/api/v1/methods"):
            continue
        if path.startswith("/api/v1/models"):
            values["name"] = "secret-model"
        elif path.startswith("/api/v1/datasets"):
            values["name"] = "secret-set"
        r = app.request(method, fill(path, **values), json={} if method in ("POST", "PUT", "PATCH") else None)
        expected = 403 if path.startswith(OPERATOR_ONLY) else 404
        assert r.status_code == expected, (method, path, r.status_code, r.text)
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


# -- the operator: creating projects and setting quotas (issue 27, item 8) --------------------------
def test_only_the_operator_creates_projects_and_sets_quotas(app, settings):
    operator = bootstrap_admin_key(settings)  # the key `crucible up` writes: the server's operator
    as_key(app, make_key(settings, project="alpha"))  # an admin of another project
    body = problem(app.post("/api/v1/projects", json={"name": "mine", "max_stored_bytes": 10**18}), 403)
    assert "operator" in body["detail"]
    as_key(app, make_key(settings))  # an admin of `default` is not the operator either
    problem(app.post("/api/v1/projects", json={"name": "mine"}), 403)
    problem(app.patch("/api/v1/projects/alpha", json={"max_stored_bytes": 10**18}), 403)
    operator_id = next(k["id"] for k in app.get("/api/v1/keys").json()["items"] if k["role"] == "operator")
    problem(app.delete(f"/api/v1/keys/{operator_id}"), 403)  # nor can it revoke the operator's key

    as_key(app, operator)
    assert app.get("/api/v1/whoami").json()["role"] == "operator"
    made = app.post("/api/v1/projects", json={"name": "mine", "max_stored_bytes": 1 << 30})
    assert made.status_code == 201 and made.json()["admin_key"]["role"] == "admin"
    problem(app.post("/api/v1/projects", json={"name": "mine"}), 409, "/name")  # only the operator can see this
    quotas = app.patch("/api/v1/projects/mine", json={"max_active_jobs": 5})
    assert quotas.status_code == 200 and quotas.json()["max_active_jobs"] == 5
    assert quotas.json()["max_stored_bytes"] == 1 << 30  # left out: kept
    problem(app.patch("/api/v1/projects/nope", json={}), 404)
    problem(app.post("/api/v1/projects", json={"name": "huge", "max_stored_bytes": 10**26}), 422, "/max_stored_bytes")
    # the new project's admin manages its keys, but cannot mint an operator or a project
    as_key(app, made.json()["admin_key"]["key"])
    problem(app.post("/api/v1/keys", json={"role": "operator"}), 422, "/role")
    problem(app.post("/api/v1/projects", json={"name": "other"}), 403)


def test_metrics_are_the_projects_own_for_an_admin_and_all_for_the_operator(app, settings):
    as_key(app, make_key(settings, project="alpha"))
    for _ in range(3):
        app.post("/api/v1/jobs", json={"method": "test-counter"})
    as_key(app, make_key(settings, project="beta"))
    app.post("/api/v1/jobs", json={"method": "test-counter"})
    assert 'crucible_jobs{status="queued"} 1\n' in app.get("/metrics").text
    as_key(app, bootstrap_admin_key(settings))
    assert 'crucible_jobs{status="queued"} 4\n' in app.get("/metrics").text


# -- login CSRF (item 10) ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}]
)
def test_another_site_cannot_log_a_browser_in_or_out(app, settings, headers):
    key = make_key(settings, role="member")
    for r in (
        app.get(f"/?token={key}", headers=headers, follow_redirects=False),
        app.post("/login", data={"key": key}, headers=headers, follow_redirects=False),
        app.post("/logout", headers=headers, follow_redirects=False),
    ):
        assert "set-cookie" not in r.headers
        assert "csrf" in problem(r, 403)["type"]
    # the same login from the server's own page, a pasted link, or a script works
    for own in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "http://testserver"}, {}):
        r = app.post("/login", data={"key": key}, headers=own, follow_redirects=False)
        assert r.status_code == 303 and SESSION_COOKIE in r.headers["set-cookie"], own


# -- rate limits per project, and failed authentication (item 9) --------------------------------------
def test_a_fresh_key_does_not_reset_the_projects_rate_limit(tmp_path):
    s = make_settings(tmp_path / "h", rate_limit_submit_per_minute=3, rate_limit_submit_per_minute_per_project=4)
    upgrade(s.database_url)
    with TestClient(create_app(s, run_executor=False)) as client:
        admin = make_key(s)
        as_key(client, admin)
        assert [client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code for _ in range(3)] == [201] * 3
        fresh = client.post("/api/v1/keys", json={"role": "member"}).json()["key"]
        as_key(client, fresh)
        assert client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code == 201
        body = problem(client.post("/api/v1/jobs", json={"method": "test-counter"}), 429)
        assert "PER_PROJECT" in body["detail"] and body["limit_per_minute"] == 4
        as_key(client, make_key(s, project="other"))  # another project has its own budget
        assert client.post("/api/v1/jobs", json={"method": "test-counter"}).status_code == 201


def test_failed_authentication_is_rate_limited_per_address(tmp_path):
    s = make_settings(tmp_path / "h", auth_failures_per_minute=3)
    upgrade(s.database_url)
    with TestClient(create_app(s, run_executor=False)) as client:
        bad = {"Authorization": "Bearer cru_" + "x" * 43}
        assert [client.get("/api/v1/jobs", headers=bad).status_code for _ in range(3)] == [401] * 3
        body = problem(client.get("/api/v1/jobs", headers=bad), 429)
        assert "AUTH_FAILURES" in body["detail"] and int(client.get("/api/v1/jobs", headers=bad).headers["Retry-After"])
        problem(client.post("/login", data={"key": "cru_nope"}, follow_redirects=False), 429)
        # a valid key from the same address still works: a neighbour's failures lock no one out
        good = {"Authorization": f"Bearer {make_key(s)}"}
        assert client.get("/api/v1/jobs", headers=good).status_code == 200


# -- request ids (item 14) -----------------------------------------------------------------------------
def test_a_client_request_id_is_bounded_or_replaced(app, settings):
    as_key(app, make_key(settings))
    r = app.post("/api/v1/jobs", json={"method": "test-counter"}, headers={"X-Request-ID": "x" * 10_000})
    ours = r.headers["X-Request-ID"]
    assert r.status_code == 201 and re.fullmatch(r"[0-9a-f]{32}", ours)
    r = app.post("/api/v1/jobs", json={"method": "test-counter"}, headers={"X-Request-ID": "<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    kept = app.post("/api/v1/jobs", json={"method": "test-counter"}, headers={"X-Request-ID": "ci-run.42"})
    assert kept.headers["X-Request-ID"] == "ci-run.42"
    ids = [e["request_id"] for e in app.get("/api/v1/audit", params={"action": "job.submit"}).json()["items"]]
    assert ids == ["ci-run.42", r.headers["X-Request-ID"], ours]


# -- numbers past 64 bits are 422s, not 500s (item 12) ---------------------------------------------------
def test_huge_numbers_are_422s_naming_the_parameter(app, settings):
    as_key(app, make_key(settings))
    job = app.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"]
    problem(app.get(f"/api/v1/jobs/{job}/logs", params={"offset": 2**63}), 422, "/offset")
    problem(app.get(f"/api/v1/jobs/{job}/metrics", params={"since_step": 10**20}), 422, "/since_step")
    problem(app.get("/api/v1/audit", params={"before": 10**23}), 422, "/before")


# -- files of the state folder (item 13) -----------------------------------------------------------------
def test_state_and_caches_are_readable_by_this_user_only(settings, store):
    from workers.context import resolve_model

    with TestClient(create_app(settings, run_executor=False)) as client:
        as_key(client, make_key(settings))
        r = client.post("/api/v1/models", data={"name": "mm"}, files={"file": ("m.zip", model_folder_zip())})
        assert r.status_code == 201, r.text
    resolve_model("mm", settings, store)  # fills the local model cache
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(settings.home) == 0o700 and mode(settings.cache_dir) == 0o700  # nothing below is reachable
    databases = list(settings.home.glob("crucible.db*"))
    assert databases and all(mode(p) == 0o600 for p in databases), {p.name: oct(mode(p)) for p in databases}
    assert mode(settings.home / "objects") == 0o700


def test_up_prints_the_login_link_only_to_a_terminal(tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from api.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    home = tmp_path / "h"
    result = CliRunner().invoke(
        main, ["up", "--no-demo", "--port", "8765"], env={"CRUCIBLE_HOME": str(home), "CRUCIBLE_PLUGINS": ""}
    )
    assert result.exit_code == 0, result.output
    key = (home / "admin-key").read_text().strip()
    printed = "".join(result.output.split())  # the console wraps long lines
    assert key not in printed and "admin-key" in printed  # output redirected: no secret in it
