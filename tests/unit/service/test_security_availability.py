"""Attacks on the server's availability: one member key must not freeze or exhaust it (issue 27).

Blocking work stays off the event loop (health answers while an archive is read, a dataset parsed, a
chat template rendered: asserted as an ordering, with generous timeouts only as hang guards), templates
run under a deadline, request bodies are counted as they stream, a vanished client's generation stops,
requests are capped in tokens and counted per prompt, warm models share a memory budget, and the job
queue shares the executors fairly between projects. The live-server tests run uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import select
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

import workers.archives
import workers.datasets
from api.app import create_app
from api.routes import openai_compat
from serving import llm
from tests.conftest import make_key, make_settings
from tests.unit.service.attacks import (
    HOLD_S,
    Hold,
    as_key,
    client_for,
    health_answers_while_held,
    live_server,
    open_request,
    read_status,
    replace_in_zip,
    tar_gz_of,
)
from tests.unit.service.test_api import npz, problem
from tests.unit.service.test_deployments import deploy, import_zip
from workers import lifecycle
from workers.db import session_scope, upgrade
from workers.tables import Deployment, Job

USER = [{"role": "user", "content": "def add(a, b):"}]
SLOW_TEMPLATE = "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}{{ 'x' }}"


# -- blocking work runs off the event loop (item 1) ----------------------------------------------------------
def test_health_answers_while_an_archive_is_read(tmp_path, monkeypatch):
    hold = Hold()
    monkeypatch.setattr(workers.archives, "members", hold.wrap(workers.archives.members))
    folders = tar_gz_of({f"d{i}/": None for i in range(5000)})
    with client_for(make_settings(tmp_path / "h", max_archive_files=100)) as client:
        attack = lambda: client.post("/api/v1/models", data={"name": "dirs"}, files={"file": ("d.tar.gz", folders)})  # noqa: E731
        problem(health_answers_while_held(client, attack, hold), 413)


def test_health_answers_while_a_dataset_is_parsed(tmp_path, monkeypatch):
    hold = Hold()
    monkeypatch.setattr(workers.datasets, "parse_upload", hold.wrap(workers.datasets.parse_upload))
    data = npz(x_train=np.zeros((40, 3), np.float32), y_train=np.arange(40) % 2)
    with client_for(make_settings(tmp_path / "h")) as client:
        attack = lambda: client.post(  # noqa: E731
            "/api/v1/datasets", data={"name": "rows", "kind": "tabular"}, files={"file": ("r.npz", data)}
        )
        assert health_answers_while_held(client, attack, hold).status_code == 201


@pytest.fixture
def slow_template_chat(tmp_path, model_zips):
    s = make_settings(tmp_path / "h", template_timeout_s=0.5)
    with client_for(s) as client:
        import_zip(client, "slow", replace_in_zip(model_zips["llm"], "chat_template.jinja", SLOW_TEMPLATE.encode()))
        deploy(client, "slow", "slow")
        yield client


def test_health_answers_while_a_chat_template_renders_and_the_template_is_stopped(slow_template_chat, monkeypatch):
    hold = Hold()
    monkeypatch.setattr(llm, "chat_prompt", hold.wrap(llm.chat_prompt))
    client = slow_template_chat
    attack = lambda: client.post("/v1/chat/completions", json={"model": "slow", "messages": USER})  # noqa: E731
    body = problem(health_answers_while_held(client, attack, hold), 422, "/messages")
    assert body["type"] == "/problems/chat-template-timeout" and "CRUCIBLE_TEMPLATE_TIMEOUT_S" in body["detail"]
    assert body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"  # OpenAI's shape


@pytest.mark.parametrize(
    ("template", "slug"),
    [
        ("{{ ''.__class__.__mro__ }}", "chat-template-error"),  # the sandbox's SecurityError
        ("{{ raise_exception('roles must alternate') }}", "chat-template-error"),
        ("{% for %}", "chat-template-error"),  # a syntax error
    ],
)
def test_a_failing_chat_template_is_422_naming_messages(tmp_path, model_zips, template, slug):
    with client_for(make_settings(tmp_path / "h")) as client:
        import_zip(client, "bad-tpl", replace_in_zip(model_zips["llm"], "chat_template.jinja", template.encode()))
        deploy(client, "bad-tpl", "bad-tpl")
        r = client.post("/v1/chat/completions", json={"model": "bad-tpl", "messages": USER})
        assert problem(r, 422, "/messages")["type"] == f"/problems/{slug}"


# -- body caps count the bytes as they stream (item 3) ----------------------------------------------------
@pytest.mark.parametrize(
    ("path", "content_type", "opening"),
    [
        ("/api/v1/jobs", "application/json", b'{"method": "test-counter", "tags": {"x": "'),
        (
            "/api/v1/datasets",
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="f.npz"\r\n\r\n',
        ),
    ],
)
def test_a_chunked_body_is_refused_once_it_passes_the_cap_before_it_ends(tmp_path, path, content_type, opening):
    s = make_settings(tmp_path / "h", max_json_bytes=64 * 1024, max_upload_bytes=64 * 1024)
    upgrade(s.database_url)
    key = make_key(s)
    chunk, total = b"a" * 32 * 1024, 0
    with live_server(create_app(s, run_executor=False)) as port:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type, "Transfer-Encoding": "chunked"}
        sock = open_request(port, "POST", path, headers)
        answered = False
        try:
            for i in range(400):  # up to 12.5 MiB, paced once past the cap; the server answers long before
                piece = opening + chunk if i == 0 else chunk
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                total += len(piece)
                if total > 2 * 1024 * 1024 and select.select([sock], [], [], 0.05)[0]:
                    answered = True
                    break
        except OSError:  # the server answered and closed while we were still sending
            answered = True
        status, response = read_status(sock)
        sock.close()
    assert answered and status == 413, response[:300]
    assert b"body-too-large" in response or b"too large" in response.lower()


def test_a_chunked_json_body_over_the_cap_is_413_in_process(api):
    big = (b'{"method": "test-counter", "tags": {"x": "', b"a" * 2_000_000, b'"}}')
    problem(api.post("/api/v1/jobs", content=iter(big), headers={"content-type": "application/json"}), 413)


# -- a vanished client's generation stops, streamed or not (item 6) -------------------------------------
@pytest.fixture
def fake_generation(settings, monkeypatch):
    """A deployment `fake` whose generation runs until it is aborted (or released by the test)."""
    from serving.loaded import Loaded

    make_key(settings)  # the default project exists
    with session_scope(settings.database_url) as session:
        session.add(Deployment(project="default", name="fake", model="x@1", kind="llm", engine={}, status="ready"))
    loaded = Loaded("fake-id", "llm", {})
    state = SimpleNamespace(
        started=threading.Event(), aborted=threading.Event(), release=threading.Event(), loaded=loaded
    )

    async def prepare(request, row, settings, store):
        return loaded

    def run(loaded, p, abort, on_delta=None, on_finish=None):
        state.started.set()
        while not (abort.wait(0.05) or state.release.is_set()):
            pass
        if abort.is_set():
            state.aborted.set()
        return []

    monkeypatch.setattr(openai_compat, "_prepare", prepare)
    monkeypatch.setattr(
        openai_compat, "_plan", lambda *args: SimpleNamespace(n=1, top_logprobs=None, prompt_tokens=0, path="batch")
    )
    monkeypatch.setattr(openai_compat.llm, "generate", run)
    monkeypatch.setattr(openai_compat.llm, "usage", lambda p, done: {})
    yield state
    state.release.set()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_stops_its_generation(settings, fake_generation, stream):
    key = make_key(settings)
    body = json.dumps({"model": "fake", "prompt": "hi", "stream": stream}).encode()
    with live_server(create_app(settings, run_executor=False)) as port:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        sock = open_request(port, "POST", "/v1/completions", {**headers, "Content-Length": str(len(body))}, body)
        assert fake_generation.started.wait(HOLD_S), "the generation never started"
        sock.close()  # the client goes away mid-generation
        assert fake_generation.aborted.wait(HOLD_S), "the generation ran on for a client that was gone"


def test_a_deployment_admits_a_bounded_number_of_requests(settings, fake_generation):
    s = settings.model_copy(update={"max_inflight_per_deployment": 1})
    with TestClient(create_app(s, run_executor=False)) as client, ThreadPoolExecutor(2) as pool:
        as_key(client, make_key(s))
        ask = lambda prompt: client.post("/v1/completions", json={"model": "fake", "prompt": prompt})  # noqa: E731
        first = pool.submit(ask, "a")
        try:
            assert fake_generation.started.wait(HOLD_S)
            busy = pool.submit(ask, "b").result(timeout=HOLD_S)  # a hang guard: it must not wait for the model
        finally:
            fake_generation.release.set()
        body = problem(busy, 429)
        assert "CRUCIBLE_MAX_INFLIGHT_PER_DEPLOYMENT" in body["detail"] and body["error"]["type"] == "rate_limit_error"
        assert first.result(timeout=HOLD_S).status_code == 200


# -- prompts × n × max_tokens, and each prompt against the rate limit (item 5) ----------------------------
def test_a_list_of_prompts_cannot_bypass_the_caps(api, model_zips):
    import_zip(api, "tiny-llm", model_zips["llm"])
    deploy(api, "chat", "tiny-llm")
    body = problem(api.post("/v1/completions", json={"model": "chat", "prompt": ["hi"] * 300}), 422, "/prompt")
    assert "max_request_tokens" in body["detail"] and "300 prompt" in body["detail"]
    # 20 × 4 × 200 = 16000 > 8192 (each within its own cap: the model's 256-token context caps max_tokens at 255)
    r = api.post("/v1/completions", json={"model": "chat", "prompt": ["hi"] * 20, "n": 4, "max_tokens": 200})
    problem(r, 422, "/prompt")
    ok = api.post("/v1/completions", json={"model": "chat", "prompt": ["hi", "def"], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    small = deploy(api, "small", "tiny-llm", max_request_tokens=4)
    assert small["engine"]["max_request_tokens"] == 4
    r = api.post("/v1/completions", json={"model": "small", "prompt": ["a", "b", "c"], "max_tokens": 2})
    problem(r, 422, "/prompt")


def test_each_prompt_counts_against_the_inference_rate_limit(tmp_path, model_zips):
    with client_for(make_settings(tmp_path / "h", rate_limit_inference_per_minute=5)) as client:
        import_zip(client, "tiny-llm", model_zips["llm"])
        deploy(client, "chat", "tiny-llm")
        ask = lambda k: client.post("/v1/completions", json={"model": "chat", "prompt": ["hi"] * k, "max_tokens": 1})  # noqa: E731
        body = problem(ask(6), 429)
        assert "counts 6" in body["detail"] and body["error"]["type"] == "rate_limit_error"
        assert ask(3).status_code == 200
        problem(ask(3), 429)  # 3 + 3 prompts > 5 per minute, though only two requests


# -- warm models share a memory budget; deployments per project are limited (item 7) -------------------------
def test_warm_deployments_fit_a_memory_budget_least_recently_used_first(tmp_path, model_zips):
    from serving.engines import validate_engine
    from serving.manager import load, loaded_bytes

    folder = tmp_path / "tiny"
    zipfile.ZipFile(io.BytesIO(model_zips["llm"])).extractall(folder)
    size = loaded_bytes(load("llm", folder, validate_engine("llm", {})))
    s = make_settings(tmp_path / "h", serving_memory_bytes=int(size * 1.5), max_deployments_per_project=3)
    with client_for(s) as client:
        import_zip(client, "tiny-llm", model_zips["llm"])
        for name in ("one", "two", "three"):
            assert deploy(client, name, "tiny-llm")["memory_bytes"] == size

        def warm() -> set[str]:
            return {d["name"] for d in client.get("/api/v1/deployments").json()["items"] if d["warm"]}

        assert warm() == {"three"}  # each new one pushed the least recently used out
        r = client.post("/v1/completions", json={"model": "one", "prompt": "def", "max_tokens": 1})
        assert r.status_code == 200  # an unloaded deployment loads again on its next request
        assert warm() == {"one"}
        body = problem(client.post("/api/v1/deployments", json={"name": "four", "model": "tiny-llm"}), 429)
        assert "CRUCIBLE_MAX_DEPLOYMENTS_PER_PROJECT" in body["detail"]
    tight = make_settings(tmp_path / "h2", serving_memory_bytes=size // 2)
    with client_for(tight) as client:
        import_zip(client, "tiny-llm", model_zips["llm"])
        r = client.post("/api/v1/deployments", json={"name": "big", "model": "tiny-llm"})
        assert "CRUCIBLE_SERVING_MEMORY_BYTES" in problem(r, 422, "/model")["detail"]


# -- the queue is shared fairly; resources are checked (item 15) -----------------------------------------------
def test_priority_orders_a_projects_own_jobs_not_other_projects(settings):
    for project in ("greedy", "modest"):
        make_key(settings, project=project)
    with session_scope(settings.database_url) as s:
        s.add(Job(method="test-counter", project="greedy", status="running", priority=9))
        s.add_all(Job(method="test-counter", project="greedy", priority=9) for _ in range(5))
        s.add(Job(method="test-counter", project="modest", priority=0))
    with session_scope(settings.database_url) as s:
        queue = list(s.scalars(lifecycle.fair_queue()))
        assert queue[0].project == "modest"  # greedy already runs one: modest goes first despite priority 9
        assert [j.priority for j in queue[1:]] == [9] * 5


def test_resources_beyond_what_an_executor_gives_are_422(tmp_path):
    with client_for(make_settings(tmp_path / "h", max_job_cpus=4, max_job_gpus=0)) as client:
        for resources, pointer in (({"cpus": 256}, "/resources/cpus"), ({"gpus": 16}, "/resources/gpus")):
            r = client.post("/api/v1/jobs", json={"method": "test-counter", "resources": resources})
            assert "CRUCIBLE_MAX_JOB" in problem(r, 422, pointer)["detail"]
        r = client.post("/api/v1/jobs", json={"method": "test-counter", "resources": {"cpus": 4}})
        assert r.status_code == 201
