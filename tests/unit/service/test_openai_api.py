"""The OpenAI-compatible routes and the generation loop under them.

Generation-level invariants: temperature 0 equals HF `generate(do_sample=False)` token for token; a
seed reproduces the text; top-p keeps exactly the nucleus; an abort stops within one token and
releases the model's lock; stop strings cut the text before the match. Route-level: response and
SSE chunk shapes ending in `data: [DONE]`, streamed text equals the non-streamed text at the same
seed, usage counts, caps and context as 4xx naming the field, concurrent requests do not mix.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models.llm.generation import Completion, SamplingParams, generate_tokens, next_token, stop_token_ids, stream_text
from serving import llm
from serving.engines import validate_engine
from serving.manager import load
from tests.unit.service.test_api import problem
from tests.unit.service.test_deployments import deploy, import_zip, tiny_llm_folder

torch.set_num_threads(1)
USER = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load("llm", tiny_llm_folder(tmp_path_factory.mktemp("llm") / "m"), validate_engine("llm", {}))


@pytest.fixture
def chat(api, model_zips):  # noqa: F811
    import_zip(api, "tiny-llm", model_zips["llm"])
    deploy(api, "chat", "tiny-llm", max_n=3, max_tokens_cap=40)
    return api


def prompt_ids(loaded, text="def add"):
    return loaded.llm.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- the generation loop ---------------------------------------------------------------
def test_greedy_equals_hf_generate(loaded):
    ids = prompt_ids(loaded)
    ours = list(generate_tokens(loaded.llm.model, ids, SamplingParams(max_tokens=12, temperature=0), torch.Generator()))
    hf = loaded.llm.model.generate(
        torch.tensor([ids]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=sorted(stop_token_ids(loaded.llm.tokenizer)),
        pad_token_id=loaded.llm.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    stops = stop_token_ids(loaded.llm.tokenizer)
    hf = hf[: next((i for i, t in enumerate(hf) if t in stops), len(hf))]
    assert ours == hf and len(ours) > 0


def test_a_seed_reproduces_and_different_seeds_differ(loaded):
    ids, params = prompt_ids(loaded), SamplingParams(max_tokens=16, temperature=1.0)
    run = lambda seed: list(generate_tokens(loaded.llm.model, ids, params, torch.Generator().manual_seed(seed)))  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_p_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {next_token(logits, 1.0, 0.7, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 ≥ 0.7: the nucleus is the first two
    assert {next_token(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)} == {0}
    assert next_token(logits, 0.0, 1.0, torch.Generator()) == 0


def test_abort_stops_generation_within_one_token(loaded):
    produced = []
    params = SamplingParams(max_tokens=50, temperature=1.0)
    for token in generate_tokens(
        loaded.llm.model,
        prompt_ids(loaded),
        params,
        torch.Generator().manual_seed(0),
        should_abort=lambda: len(produced) >= 3,
    ):
        produced.append(token)
    assert len(produced) == 3


def test_an_aborted_request_releases_the_model(loaded):
    p = llm.plan(loaded, ["def add"], "prompt", max_tokens=None, temperature=1.0, top_p=1.0, n=2, stop=None, seed=0)
    abort = threading.Event()
    seen: list[str] = []

    def on_delta(index: int, delta: str) -> None:
        seen.append(delta)
        abort.set()  # the client went away after the first delta

    done = llm.run(loaded, p, abort, on_delta=on_delta)
    assert len(seen) == 1 and len(done) == 1 and done[0].finish_reason == "abort"
    assert loaded.lock.acquire(blocking=False)
    loaded.lock.release()
    # a request waiting for the lock gives up when aborted
    with loaded.lock:
        assert llm.run(loaded, p, abort) == []


def test_stop_strings_cut_before_the_match(loaded):
    ids, gen = prompt_ids(loaded), lambda: torch.Generator().manual_seed(11)
    free = Completion()
    text = "".join(
        stream_text(
            loaded.llm.model, loaded.llm.tokenizer, ids, SamplingParams(max_tokens=30, temperature=1.0), gen(), free
        )
    )
    assert text == free.text and len(text) > 4
    stop = text[3:5]
    cut = Completion()
    streamed = "".join(
        stream_text(
            loaded.llm.model,
            loaded.llm.tokenizer,
            ids,
            SamplingParams(max_tokens=30, temperature=1.0, stop=(stop,)),
            gen(),
            cut,
        )
    )
    assert cut.text == text[: text.find(stop)] == streamed and cut.finish_reason == "stop"


# -- the routes ------------------------------------------------------------------------
def sse_events(r) -> list:
    lines = [line for line in r.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), r.text
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_lists_llm_deployments(chat):
    r = chat.get("/v1/models").json()
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == ["chat"]
    assert chat.get("/v1/models/chat").json()["root"] == "tiny-llm@1"
    problem(chat.get("/v1/models/nope"), 404)


def test_chat_completion_shape_usage_and_seed(chat, loaded):
    body = {"model": "chat", "messages": USER, "max_tokens": 8, "seed": 7, "temperature": 0.9, "top_p": 0.95}
    r = chat.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "chat" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    template = llm.chat_prompt(loaded.llm.tokenizer, USER)
    assert template.endswith("<|assistant|>\n")
    assert out["usage"]["prompt_tokens"] == len(prompt_ids(loaded, template))
    assert 1 <= out["usage"]["completion_tokens"] <= 8
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert chat.post("/v1/chat/completions", json=body).json()["choices"] == out["choices"]


def test_n_choices_and_completions(chat):
    r = chat.post("/v1/chat/completions", json={"model": "chat", "messages": USER, "n": 3, "max_tokens": 4, "seed": 1})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    r = chat.post(
        "/v1/completions",
        json={"model": "chat", "prompt": ["def f", "import"], "n": 2, "max_tokens": 4, "seed": 2, "echo": True},
    )
    out = r.json()
    assert r.status_code == 200 and out["object"] == "text_completion" and len(out["choices"]) == 4
    assert out["choices"][2]["text"].startswith("import")


def test_streaming_chunks_end_with_done_and_match_the_plain_answer(chat):
    body = {"model": "chat", "messages": USER, "max_tokens": 10, "seed": 5}
    plain = chat.post("/v1/chat/completions", json=body).json()
    r = chat.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    r = chat.post(
        "/v1/completions", json={"model": "chat", "prompt": "def", "max_tokens": 5, "stream": True, "seed": 1}
    )
    events = sse_events(r)
    assert events and all(e["object"] == "text_completion" for e in events)


@pytest.mark.parametrize(
    ("body", "status", "pointer"),
    [
        ({"n": 4}, 422, "/n"),
        ({"max_tokens": 41}, 422, "/max_tokens"),
        ({"temperature": 3}, 422, "/temperature"),
        ({"top_p": 0}, 422, "/top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "/stop"),
        ({"messages": []}, 422, "/messages"),
        ({"messages": [{"role": "user", "content": "x " * 400}]}, 400, "/messages"),
        ({"messages": [{"role": "user", "content": "x " * 230}], "max_tokens": 40}, 400, "/max_tokens"),
        ({"model": "nope"}, 404, "/model"),
    ],
)
def test_bad_chat_requests(chat, body, status, pointer):
    r = chat.post("/v1/chat/completions", json={"model": "chat", "messages": USER, **body})
    problem(r, status, pointer)


def test_completion_prompt_longer_than_context_names_prompt(chat):
    problem(chat.post("/v1/completions", json={"model": "chat", "prompt": "x " * 400}), 400, "/prompt")


def test_no_key_is_401(chat):
    del chat.headers["Authorization"]
    problem(chat.post("/v1/chat/completions", json={"model": "chat", "messages": USER}), 401)
    problem(chat.get("/v1/models"), 401)


def test_concurrent_requests_do_not_mix(chat):
    bodies = [
        {"model": "chat", "messages": [{"role": "user", "content": f"print({i})"}], "max_tokens": 8, "seed": i}
        for i in range(4)
    ]
    alone = [chat.post("/v1/chat/completions", json=b).json()["choices"] for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: chat.post("/v1/chat/completions", json=b).json()["choices"], bodies))
    assert together == alone
