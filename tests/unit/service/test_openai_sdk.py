"""The official `openai` SDK against the server on loopback: an error's exception text says what is wrong.

The SDK puts only `error.message` of a body in the exception text (and `error.param`, `.code`, `.type` on the
exception), so every `/v1/*` error carries OpenAI's error object beside the RFC 9457 fields.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from api.app import create_app
from tests.conftest import make_key
from tests.unit.service.attacks import live_server

USER = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture
def client(settings, model_zips) -> Iterator[openai.OpenAI]:  # noqa: F811
    key = make_key(settings)
    with live_server(create_app(settings, run_executor=False)) as port:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
            r = http.post("/api/v1/models", data={"name": "tiny-llm"}, files={"file": ("m.zip", model_zips["llm"])})
            assert r.status_code == 201, r.text
            r = http.post(
                "/api/v1/deployments", json={"name": "chat", "model": "tiny-llm", "engine": {"max_tokens_cap": 40}}
            )
            assert r.status_code == 201, r.text
        yield openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_sdk_exceptions_name_the_problem_and_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(model="chat", prompt="x", max_tokens=100000)
    assert "max_tokens" in str(caught.value) and "at most 40 tokens" in str(caught.value)
    assert caught.value.param == "max_tokens" and caught.value.type == "invalid_request_error"

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="chat", messages=USER, n=0)
    assert caught.value.param == "n" and "greater than or equal to 1" in str(caught.value)

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.param == "messages[0].role" and "messages/0/role" in str(caught.value)

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=USER)
    assert "no llm deployment named 'nope'" in str(caught.value)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="chat", prompt="x " * 400, max_tokens=5)
    assert "context" in str(caught.value) and caught.value.param == "prompt"


def test_a_wrong_key_says_so_through_the_sdk(client):
    wrong = openai.OpenAI(base_url=str(client.base_url), api_key="cru_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert "key" in str(caught.value).lower() and caught.value.code == "invalid_api_key"
