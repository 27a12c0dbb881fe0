"""What a new user and a fuzzer ran into (issue 26): numbers past 64 bits, values the server ignored, caps a
model cannot meet. Each is a 4xx problem body naming the parameter at fault."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.service.test_api import problem
from tests.unit.service.test_deployments import deploy, import_zip

INT64_MAX = 2**63 - 1
HUGE = [2**63, 2**64, 10**30]


def integer_fields(doc: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(method, path, where/name, schema) of every integer a request can carry: query, path, header, JSON body."""
    schemas = doc["components"]["schemas"]

    def walk(schema: dict[str, Any], where: str, out: list[tuple[str, dict[str, Any]]]) -> None:
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in schema.get(key, []):
                walk(sub, where, out)
        if schema.get("type") == "integer":
            out.append((where, schema))
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, f"{where}/{name}", out)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{where}/*", out)

    found = []
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            out: list[tuple[str, dict[str, Any]]] = []
            for param in op.get("parameters", []):
                walk(param["schema"], f"{param['in']}:{param['name']}", out)
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                walk(content["schema"], f"body:{media}", out)
            found += [(method.upper(), path, where, schema) for where, schema in out]
    return found


def test_every_integer_a_request_carries_is_bounded_inside_64_bits(api):
    fields = integer_fields(api.get("/openapi.json").json())
    assert len(fields) > 20
    unbounded = [(m, p, w) for m, p, w, s in fields if s.get("maximum") is None or s["maximum"] > INT64_MAX]
    assert not unbounded, unbounded


def query_integers(api) -> list[tuple[str, str]]:
    return [
        (path, where.split(":", 1)[1])
        for method, path, where, _ in integer_fields(api.get("/openapi.json").json())
        if method == "GET" and where.startswith("query:")
    ]


def test_integer_query_parameters_past_64_bits_are_422_naming_them(api):
    job = api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"]
    params = query_integers(api)
    assert {"since_step", "offset", "before", "limit", "max_points"} <= {name for _, name in params}
    for path, name in params:
        for value in HUGE:
            r = api.get(path.replace("{job_id}", job), params={name: value})
            problem(r, 422, f"/{name}")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"method": "test-counter", "seed": 2**64}, "/seed"),
        ({"method": "test-counter", "priority": 2**64}, "/priority"),
        ({"method": "test-counter", "max_attempts": 2**64}, "/max_attempts"),
        ({"method": "test-counter", "params": {"steps": 2**64}}, "/params/steps"),
    ],
)
def test_job_fields_past_64_bits_are_422_naming_them(api, body, pointer):
    problem(api.post("/api/v1/jobs", json=body), 422, pointer)


def test_a_model_version_past_64_bits_is_422_naming_the_model(api):
    body = problem(api.post("/api/v1/deployments", json={"name": "x1", "model": f"tiny@{2**64}"}), 422, "/model")
    assert "version" in body["detail"]


@pytest.mark.parametrize(
    ("path", "params", "pointer", "says"),
    [
        ("/api/v1/jobs", {"status": "bogus"}, "/status", "unknown status 'bogus'"),
        ("/api/v1/jobs", {"status": "queued,bogus"}, "/status", "unknown status 'bogus'"),
        ("/api/v1/jobs", {"status": ""}, "/status", "unknown status"),
        ("/api/v1/jobs", {"cursor": "zzz"}, "/cursor", "next_cursor"),
        ("/api/v1/jobs", {"cursor": "01HZZZZZZZZZZZZZZZZZZZZZZ!"}, "/cursor", "next_cursor"),
        ("/api/v1/jobs", {"mode": "bogus"}, "/mode", ""),
        ("/api/v1/datasets", {"kind": "bogus"}, "/kind", "image-class"),
        ("/api/v1/methods", {"family": "bogus"}, "/family", "testing"),
    ],
)
def test_unknown_enum_values_and_malformed_cursors_are_422_naming_them(api, path, params, pointer, says):
    body = problem(api.get(path, params=params), 422, pointer)
    assert says in body["detail"]


def test_artifact_kind_filter_names_the_kinds(api):
    job = api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"]
    problem(api.get(f"/api/v1/jobs/{job}/artifacts", params={"kind": "bogus"}), 422, "/kind")
    assert api.get(f"/api/v1/jobs/{job}/artifacts", params={"kind": "checkpoint"}).json() == {"items": []}


def test_valid_filters_and_cursors_still_page(api):
    ids = [api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"] for _ in range(3)]
    first = api.get("/api/v1/jobs", params={"limit": 2, "status": "queued,running"}).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    rest = api.get("/api/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    assert api.get("/api/v1/datasets", params={"kind": "tabular"}).json()["items"][0]["kind"] == "tabular"


# -- deployments: caps the model can meet (the tiny LLM's context is 256 tokens, the tiny diffusion model 16 px) --
def test_a_cap_above_the_models_context_is_refused_at_creation(api, model_zips):
    import_zip(api, "tiny-llm", model_zips["llm"])
    r = api.post("/api/v1/deployments", json={"name": "c1", "model": "tiny-llm", "engine": {"max_tokens_cap": 512}})
    body = problem(r, 422, "/engine/max_tokens_cap")
    assert "256 tokens" in body["detail"] and "at most 255" in body["detail"]
    r = api.post(
        "/api/v1/deployments",
        json={"name": "c1", "model": "tiny-llm", "engine": {"max_tokens_cap": 100, "default_max_tokens": 200}},
    )
    problem(r, 422, "/engine/default_max_tokens")
    engine = deploy(api, "c1", "tiny-llm")["engine"]  # the defaults (512) are clamped to what the model can do
    assert engine["max_tokens_cap"] == 255 and engine["default_max_tokens"] == 64
    engine = deploy(api, "c2", "tiny-llm", max_tokens_cap=20)["engine"]
    assert engine["default_max_tokens"] == 20


def test_an_image_size_the_model_cannot_draw_is_422(api, model_zips):
    import_zip(api, "tiny-diff", model_zips["diffusion"])
    deploy(api, "draw", "tiny-diff")
    base = {"model": "draw", "prompt": "seven", "steps": 1}
    body = problem(api.post("/v1/images/generations", json={**base, "size": "1024x1024"}), 422, "/size")
    assert "16x16" in body["detail"] and body["error"]["param"] == "size"
    problem(api.post("/v1/images/generations", json={**base, "size": "big"}), 422, "/size")
    assert api.post("/v1/images/generations", json={**base, "size": "16x16"}).status_code == 200


# -- uploads: messages name the field once, and the field that was sent ---------------------------------------------
def upload(api, name: str, kind: str, blob: bytes, filename: str = "d.npz"):
    return api.post("/api/v1/datasets", data={"name": name, "kind": kind}, files={"file": (filename, blob)})


def test_upload_errors_name_the_array_that_was_sent_once(api):
    import numpy as np

    from tests.unit.service.test_api import npz

    x = np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32)
    body = problem(upload(api, "floaty", "image-class", npz(x=x, y=np.linspace(0, 1, 20))), 422, "/y")
    assert "y_train" not in body["detail"] and body["detail"].startswith("y: labels must be")
    body = problem(upload(api, "junk", "tabular", b"not a zip at all"), 422, "/file")
    assert body["detail"].startswith("file: not a readable") and "file: file:" not in body["detail"]
    assert body["errors"][0]["message"].startswith("not a readable")
    body = problem(upload(api, "split", "tabular", npz(x_train=np.zeros((4, 2), np.float32))), 422, "/y_train")
    assert body["detail"].count("y_train: ") == 1


def test_nan_for_a_bounded_number_says_it_must_be_a_number(api):
    for value in ("NaN", "Infinity"):
        raw = '{"method": "test-counter", "params": {"step_seconds": ' + value + "}}"
        r = api.post("/api/v1/jobs", content=raw, headers={"content-type": "application/json"})
        body = problem(r, 422, "/params/step_seconds")
        assert "must be a finite number" in body["detail"], body["detail"]
    r = api.post("/api/v1/jobs", json={"method": "test-counter", "params": {"step_seconds": 11}})
    assert "less than or equal to 10" in problem(r, 422, "/params/step_seconds")["detail"]


# -- the OpenAPI document and 405s ------------------------------------------------------------------------------
def test_405_lists_every_method_the_path_serves(api):
    job = api.post("/api/v1/jobs", json={"method": "test-counter"}).json()["id"]
    for method, path, allowed in (
        ("PUT", f"/api/v1/jobs/{job}", {"GET", "DELETE"}),
        ("OPTIONS", "/api/v1/deployments", {"GET", "POST"}),
        ("PATCH", "/api/v1/keys/abc", {"DELETE"}),
    ):
        r = api.request(method, path)
        body = problem(r, 405)
        assert set(r.headers["allow"].split(", ")) == allowed, (path, r.headers["allow"])
        assert method in body["detail"]


def test_the_document_describes_errors_as_problems_and_the_bearer_key(api):
    doc = api.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerKey"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    delete = doc["paths"]["/api/v1/jobs/{job_id}"]["delete"]
    assert {"204", "401", "403", "404", "409", "422"} <= set(delete["responses"])
    assert delete["security"] == [{"bearerKey": []}]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for code, response in op["responses"].items():
                if code.isdigit() and int(code) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (method, path, code)
    assert "security" not in doc["paths"]["/api/v1/health"]["get"]
    family = next(p for p in doc["paths"]["/api/v1/methods"]["get"]["parameters"] if p["name"] == "family")
    assert "testing" in family["schema"]["anyOf"][0]["enum"]
    upload = doc["paths"]["/api/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    schemas = doc["components"]["schemas"]
    form = schemas[upload["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert form["name"]["pattern"] and "image-class" in form["kind"]["enum"]


# -- deleting datasets, model versions and deployments: refused while in use, audited ---------------------------
def audit_actions(api) -> list[str]:
    return [e["action"] for e in api.get("/api/v1/audit").json()["items"]]


def test_a_dataset_is_deleted_unless_a_job_uses_it(api, store):
    import numpy as np

    from tests.unit.service.test_api import npz

    blob = npz(x_train=np.zeros((8, 3), np.float32), y_train=np.arange(8) % 2)
    assert upload(api, "mine", "tabular", blob).status_code == 201
    job = api.post("/api/v1/jobs", json={"method": "ldr", "dataset": "mine", "params": {"epochs": 1}}).json()
    body = problem(api.delete("/api/v1/datasets/mine"), 409)
    assert job["id"] in body["detail"] and body["job_id"] == job["id"]
    api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert api.delete("/api/v1/datasets/mine").status_code == 204
    problem(api.get("/api/v1/datasets/mine"), 404)
    assert store.list("datasets/default/mine/") == []
    assert "dataset.delete" in audit_actions(api)
    problem(api.delete("/api/v1/datasets/mine"), 404)
    problem(api.delete("/api/v1/datasets/digits"), 409)  # built-in
    assert upload(api, "mine", "tabular", blob).status_code == 201  # the name is free again


def test_a_model_version_is_deleted_unless_deployed_or_named_by_a_running_job(api, model_zips, settings, tmp_path):
    from tests.unit.service.test_deployments import zip_folder
    from workers.context import resolve_model
    from workers.db import session_scope
    from workers.storage import LocalStore
    from workers.tables import Job

    import_zip(api, "tiny-llm", model_zips["llm"])
    import_zip(api, "tiny-llm", model_zips["llm"])  # version 2
    deploy(api, "chat", "tiny-llm@1")
    body = problem(api.delete("/api/v1/models/tiny-llm/1"), 409)
    assert "deployment chat" in body["detail"]
    with session_scope(settings.database_url) as s:  # a queued job whose params name the latest version
        job = Job(method="test-counter", params={"base": "tiny-llm"}, project="default")
        s.add(job)
        s.flush()
        job_id = job.id
    body = problem(api.delete("/api/v1/models/tiny-llm/2"), 409)
    assert job_id in body["detail"]
    api.post(f"/api/v1/jobs/{job_id}/cancel")
    store = LocalStore(settings.home / "objects")
    cached = resolve_model("tiny-llm@2", settings, store)  # cached on this machine
    other = tmp_path / "other"  # a different model to register as version 2 later
    other.mkdir()
    for f in cached.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (other / f.name).write_bytes(f.read_bytes())
    (other / "generation_config.json").write_text('{"note": "a different model"}')
    assert api.delete("/api/v1/models/tiny-llm/2").status_code == 204
    assert [m["version"] for m in api.get("/api/v1/models/tiny-llm").json()["items"]] == [1]
    assert store.list("models/default/tiny-llm/2/") == [] and not cached.exists()
    cached.mkdir(parents=True)  # as a copy another worker still holds: its marker names the deleted files
    (cached / "generation_config.json").write_text('{"note": "the deleted model"}')
    (cached / ".complete").write_text("ok")
    assert "model.delete" in audit_actions(api)
    problem(api.delete("/api/v1/models/tiny-llm/2"), 404)
    problem(api.delete(f"/api/v1/models/tiny-llm/{2**64}"), 422, "/version")
    # version 2 again (versions are max + 1) with other files: the old cache is not served for it
    assert import_zip(api, "tiny-llm", zip_folder(other))["version"] == 2
    again = resolve_model("tiny-llm@2", settings, store)
    assert (again / "generation_config.json").read_text() == '{"note": "a different model"}'
    api.delete("/api/v1/deployments/chat")
    assert api.delete("/api/v1/models/tiny-llm/1").status_code == 204


def test_a_deployment_with_requests_in_flight_is_not_deleted(api, model_zips):
    import_zip(api, "tiny-llm", model_zips["llm"])
    deployment = deploy(api, "chat", "tiny-llm")
    loaded = api.app.state.deployments.peek(deployment["id"])
    loaded.inflight += 1  # a request running on it
    try:
        body = problem(api.delete("/api/v1/deployments/chat"), 409)
        assert "1 request" in body["detail"]
    finally:
        loaded.inflight -= 1
    assert api.delete("/api/v1/deployments/chat").status_code == 204
    assert "deployment.delete" in audit_actions(api)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"method": "test-counter", "seed": "1"}, "/seed"),
        ({"method": "test-counter", "priority": True}, "/priority"),
        ({"method": "test-counter", "resources": {"gpus": False}}, "/resources/gpus"),
        ({"method": "test-counter", "resources": {"cpus": "2"}}, "/resources/cpus"),
    ],
)
def test_numbers_are_json_numbers_not_strings_or_booleans(api, body, pointer):
    """The schema says integer or number: "1" and false are refused (a fuzzer's "schema-violating request
    accepted"), while 3.0 is the integer 3 as JSON Schema has it."""
    problem(api.post("/api/v1/jobs", json=body), 422, pointer)
    assert api.post("/api/v1/jobs", json={"method": "test-counter", "seed": 3.0}).json()["seed"] == 3


def test_an_archived_project_reads_but_refuses_writes_until_restored(api, settings):
    """Archiving (operator only) keeps a project's history readable and stops every write with a 409 that says
    how to restore it; a project with running work or deployments is not archived under it."""
    from tests.conftest import make_key
    from tests.unit.service.attacks import as_key

    operator = make_key(settings, role="operator")
    member = make_key(settings, project="gamma", role="member")
    as_key(api, member)
    job = api.post("/api/v1/jobs", json={"method": "test-counter"}).json()
    as_key(api, operator)
    busy = api.post("/api/v1/projects/gamma/archive")
    assert busy.status_code == 409 and "1 queued or running job" in busy.json()["detail"]
    as_key(api, member)
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    as_key(api, operator)
    assert api.post("/api/v1/projects/default/archive").status_code == 409  # the operator's own
    archived = api.post("/api/v1/projects/gamma/archive")
    assert archived.status_code == 200 and archived.json()["archived_at"]

    as_key(api, member)
    assert api.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    refused = api.post("/api/v1/jobs", json={"method": "test-counter"})
    assert refused.status_code == 409 and refused.json()["type"].endswith("project-archived")
    assert "/api/v1/projects/gamma/restore" in refused.json()["detail"]
    assert (
        api.post("/api/v1/projects/gamma/restore").status_code == 409
    )  # a write like any other: the operator restores

    as_key(api, operator)
    assert api.post("/api/v1/projects/gamma/restore").json()["archived_at"] is None
    assert [e["action"] for e in api.get("/api/v1/audit").json()["items"]][:2] == ["project.restore", "project.archive"]
    as_key(api, member)
    assert api.post("/api/v1/jobs", json={"method": "test-counter"}).status_code == 201
