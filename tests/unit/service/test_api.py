"""The HTTP contract, in-process (no executor): shapes, problem bodies, idempotency, uploads."""

import io

import numpy as np
import pytest

from models.datasets import builtin_infos

PROBLEM = "application/problem+json"


def problem(r, status, pointer=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body) and body["status"] == status
    if pointer:
        assert pointer in [e["pointer"] for e in body.get("errors", [])], body
    return body


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_health_methods_and_datasets(api):
    assert api.get("/api/v1/health").json()["status"] == "ok"
    methods = {m["id"]: m for m in api.get("/api/v1/methods").json()["items"]}
    assert methods["test-counter"]["params"]["properties"]["steps"]["maximum"] == 100_000
    assert api.get("/api/v1/methods", params={"pattern": "test-*"}).json()["items"][0]["id"] == "test-counter"
    kinds = {d["name"]: d["kind"] for d in api.get("/api/v1/datasets").json()["items"]}
    assert kinds["digits"] == "image-class" and kinds["stdlib-code"] == "text-corpus"
    assert kinds["synthetic-tabular"] == "tabular"


def test_submit_returns_201_location_and_queued_job(api):
    r = api.post("/api/v1/jobs", json={"method": "test-counter", "params": {"steps": 3}})
    assert r.status_code == 201 and r.headers["location"] == f"/api/v1/jobs/{r.json()['id']}"
    job = api.get(r.headers["location"]).json()
    assert job["status"] == "queued" and job["params"]["steps"] == 3 and job["params"]["checkpoint_every"] == 5


@pytest.mark.parametrize(
    "body, pointer",
    [
        ({"method": "no-such"}, "/method"),
        ({"method": "test-counter", "params": {"steps": 0}}, "/params/steps"),
        ({"method": "test-counter", "params": {"stepz": 1}}, "/params/stepz"),
        ({"method": "test-counter", "priority": 99}, "/priority"),
        ({"method": "test-counter", "surprise": 1}, "/surprise"),
        ({"method": "test-counter", "dataset": "nope"}, "/dataset"),
        ({"method": "test-counter", "mode": "reproduce", "params": {"steps": 1}}, "/params"),
    ],
)
def test_invalid_specs_name_the_field(api, body, pointer):
    body = problem(api.post("/api/v1/jobs", json=body), 422, pointer)
    assert body["detail"]
    assert api.get("/api/v1/jobs").json()["items"] == []  # nothing half-written


def test_dataset_of_the_wrong_kind_is_refused(api):
    from models.registry import get_method

    if "ldr" not in [m["id"] for m in api.get("/api/v1/methods").json()["items"]]:
        pytest.skip("ldr not registered")
    kinds = get_method("ldr").datasets
    body = problem(api.post("/api/v1/jobs", json={"method": "ldr", "dataset": "stdlib-code"}), 422, "/dataset")
    assert "text-corpus" in body["detail"] and kinds[0] in body["detail"]


def test_malformed_json_and_oversized_bodies(api):
    r = api.post("/api/v1/jobs", content=b'{"method": ', headers={"content-type": "application/json"})
    problem(r, 400)
    big = b'{"method": "test-counter", "tags": {"x": "' + b"a" * 2_000_000 + b'"}}'
    problem(api.post("/api/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)


def test_idempotency_key_replays_and_refuses_a_different_body(api):
    spec = {"method": "test-counter", "params": {"steps": 4}}
    a = api.post("/api/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    b = api.post("/api/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert a.json()["id"] == b.json()["id"] and b.headers.get("idempotent-replayed") == "true"
    problem(api.post("/api/v1/jobs", json={**spec, "seed": 1}, headers={"Idempotency-Key": "k1"}), 422)
    assert len(api.get("/api/v1/jobs").json()["items"]) == 1


def test_unknown_job_is_404_and_cancel_rules(api):
    problem(api.get("/api/v1/jobs/NOPE"), 404)
    problem(api.post("/api/v1/jobs/NOPE/cancel"), 404)
    jid = api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"]
    r = api.post(f"/api/v1/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert problem(api.post(f"/api/v1/jobs/{jid}/cancel"), 409)["job_status"] == "cancelled"


def test_cursor_pagination_and_etag(api):
    ids = [api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"] for _ in range(5)]
    first = api.get("/api/v1/jobs", params={"limit": 2}).json()
    second = api.get("/api/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = api.get("/api/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    seen = [j["id"] for page in (first, second, third) for j in page["items"]]
    assert seen == sorted(ids, reverse=True) and third["next_cursor"] is None
    r = api.get(f"/api/v1/jobs/{ids[0]}")
    assert api.get(f"/api/v1/jobs/{ids[0]}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_dataset_upload_validates_before_storing(api, settings, store):
    x, y = np.random.rand(60, 1, 8, 8).astype(np.float32), np.repeat(np.arange(3), 20)
    r = api.post(
        "/api/v1/datasets", data={"name": "mine", "kind": "image-class"}, files={"file": ("mine.npz", npz(x=x, y=y))}
    )
    assert r.status_code == 201, r.text
    assert r.json()["meta"]["num_classes"] == 3 and r.json()["source"] == "upload"
    assert api.post("/api/v1/jobs", json={"method": "test-counter", "dataset": "mine"}).status_code == 201
    problem(
        api.post(
            "/api/v1/datasets",
            data={"name": "mine", "kind": "image-class"},
            files={"file": ("mine.npz", npz(x=x, y=y))},
        ),
        409,
        "/name",
    )
    problem(
        api.post(
            "/api/v1/datasets",
            data={"name": "bad", "kind": "image-class"},
            files={"file": ("bad.npz", npz(x=np.zeros((5, 3)), y=np.zeros(5, int)))},
        ),
        422,
        "/x",  # the array the client sent, not the split the server made of it (x_train)
    )
    problem(
        api.post("/api/v1/datasets", data={"name": "bad", "kind": "image-class"}, files={"file": ("bad.csv", b"a,b")}),
        415,
        "/file",
    )
    problem(
        api.post("/api/v1/datasets", data={"name": "Bad Name!", "kind": "image-class"}, files={"file": ("x.npz", b"")}),
        422,
        "/name",
    )
    assert store.list("datasets/bad/") == []
    builtin = [d.name for d in builtin_infos() if d.kind == "image-class"]  # digits, and the families' own
    assert [d["name"] for d in api.get("/api/v1/datasets", params={"kind": "image-class"}).json()["items"]] == [
        *builtin,
        "mine",
    ]


def test_upload_over_the_size_limit_is_413_and_stores_nothing(tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import make_key, make_settings
    from workers.db import upgrade

    s = make_settings(tmp_path / "h", max_upload_bytes=4096)
    upgrade(s.database_url)
    with TestClient(create_app(s, run_executor=False)) as client:
        client.headers["Authorization"] = f"Bearer {make_key(s)}"
        r = client.post(
            "/api/v1/datasets", data={"name": "big", "kind": "tabular"}, files={"file": ("big.npz", b"\0" * 10_000)}
        )
        problem(r, 413)
        assert client.get("/api/v1/datasets/big").status_code == 404


def test_unknown_route_is_a_problem(api):
    problem(api.get("/api/v1/nothing-here"), 404)


def test_dashboard_and_prometheus(api):
    assert "Crucible" in api.get("/").text
    assert 'crucible_jobs{status="queued"}' in api.get("/metrics").text
