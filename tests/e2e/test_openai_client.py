"""A real user with the official `openai` client against a real `crucible up`: deploy, chat, stream, errors.

Also: a client that disconnects mid-stream frees the model for the next request (the server aborts
the generation instead of finishing it for nobody).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.test_server import Server
from tests.unit.service.test_deployments import tiny_llm_folder, zip_folder

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, openai.OpenAI]]:
    srv = Server(tmp_path / "home")
    srv.home.mkdir()
    srv.start()
    try:
        blob = zip_folder(tiny_llm_folder(tmp_path / "llm"))
        r = srv.http.post("/api/v1/models", data={"name": "tiny-llm"}, files={"file": ("m.zip", blob)})
        assert r.status_code == 201, r.text
        r = srv.http.post(
            "/api/v1/deployments",
            json={"name": "chat", "model": "tiny-llm", "engine": {"max_n": 2, "max_tokens_cap": 200}},
            timeout=300,
        )  # the first deployment imports transformers into the server
        assert r.status_code == 201, r.text
        yield srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.key, max_retries=0, timeout=60)
    finally:
        srv.stop()


def test_the_openai_client_chats_streams_and_gets_errors(served):
    srv, client = served
    assert [m.id for m in client.models.list()] == ["chat"]
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    reply = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=12, seed=3, n=2, temperature=0.8, top_p=0.9
    )
    assert len(reply.choices) == 2 and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 0
    plain = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, seed=3)
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=12, seed=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    text = client.completions.create(model="chat", prompt="import os\n", max_tokens=5, seed=1)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 5

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="chat", messages=messages, n=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x " * 400}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="cru_wrong", max_retries=0).models.list()


def test_a_disconnected_stream_frees_the_model(served):
    srv, client = served
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 200,
        "stream": True,
        "temperature": 1.0,
        "stop": ["\u0000never"],
    }
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.key}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # first real token: hang up
    started = time.monotonic()
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "y"}], max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 60


def run_demo(home: Path, demo: str) -> tuple[dict, Server]:
    """Run `crucible demo <demo> --smoke`'s function against a fresh real server (left running)."""
    from api import demo as demos
    from api.cli import Api, _follow

    srv = Server(home)
    srv.home.mkdir()
    srv.start()
    api = Api(srv.url, srv.key)
    try:
        return getattr(demos, f"{demo}_demo")(
            api, lambda job_id: _follow(api, job_id, quiet=True), print, smoke=True
        ), srv
    except BaseException:
        srv.stop()
        raise


def test_demo_llm_smoke_prunes_recovers_compensates_deploys_and_chats(tmp_path: Path):
    out, srv = run_demo(tmp_path / "home", "llm")
    srv.stop()
    stages = {stage: ppl for stage, _, ppl in out["stages"]}
    assert len(stages) == 4 and all(ppl is not None and ppl > 1 for ppl in stages.values()), stages
    assert out["deployment"] == "demo-chat" and out["usage"]["completion_tokens"] >= 1


def test_demo_diffusion_smoke_renders_the_cfg_vs_apg_grid(tmp_path: Path):
    out, srv = run_demo(tmp_path / "home", "diffusion")
    try:
        png = srv.http.get(out["artifacts"]["apg_vs_cfg.png"])
    finally:
        srv.stop()
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["record"]["ours"] is not None and out["record"]["baseline"] is not None
    assert out["deployment"] == "demo-digits" and out["model"].startswith("diffusion-base-") and out["images"] == 4
