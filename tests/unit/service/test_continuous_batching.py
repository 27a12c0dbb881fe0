"""Continuous batching: requests share decode forwards, and none of them can tell.

The model is the micro Llama with its weights shaken (a freshly initialised one repeats one token), so greedy
and sampled texts differ per prompt and a wrong row, position or cache would show in the tokens.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch

from models.llm.folder import save_folder
from models.llm.generation import SamplingParams
from models.llm.model import build_model, llama_config
from models.llm.tokenizer import train_tokenizer
from serving import llm
from serving.engines import validate_engine
from serving.errors import QueueFull
from serving.manager import load
from serving.scheduler import Scheduler, Sequence, scheduler_of
from tests.unit.service.test_api import problem
from tests.unit.service.test_deployments import CORPUS, deploy, import_zip, zip_folder

PROMPTS = [
    "def add(a, b):",
    "import os\nimport sys\n" * 6,
    "x",
    "class Foo:\n    def bar(self):\n" * 4,
    "for i in range(10):",
    "print('hello world')",
    "# a comment " * 12,
    "return",
]


def shaken_folder(dest: Path) -> Path:
    tok = train_tokenizer(CORPUS, vocab_size=300, model_max_length=256, min_frequency=1)
    config = llama_config("micro", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=0)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.3)
    return save_folder(model, tok, dest)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shaken_folder(tmp_path_factory.mktemp("batching") / "m")


def deployment(folder: Path, **engine):
    return load("llm", folder, validate_engine("llm", {"max_batch_size": 8, "prefill_chunk": 16, **engine}, folder))


def plan(loaded, i: int, **kw) -> llm.Plan:
    """Request i: its own prompt length and max_tokens; odd ones greedy, even ones sampled at their own seed."""
    args = {"max_tokens": 30 + 3 * i, "temperature": 0.0 if i % 2 else 0.9, "top_p": 0.9, "n": 1, "stop": None}
    return llm.plan(loaded, [PROMPTS[i]], "prompt", **{**args, "seed": i, "logprobs": 3, **kw})


def outcome(p: llm.Plan, done) -> list:
    """Tokens, finish reasons and every logprob (the chosen token and the top 3): one bit off shows."""
    return [
        (c.token_ids, c.finish_reason, [(r.token, r.logprob, r.top) for r in lp]) for c, lp in zip(done, p.logprobs)
    ]


def together(loaded, plans: list[llm.Plan]) -> list:
    """Run the plans from threads released at once, so their sequences join one batch."""
    results: list = [None] * len(plans)
    start = threading.Barrier(len(plans))

    def go(i: int) -> None:
        start.wait()
        results[i] = outcome(plans[i], llm.generate(loaded, plans[i], threading.Event()))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_greedy_and_seeded_outputs_are_identical_alone_and_in_a_batch_of_eight(folder):
    loaded = deployment(folder)
    alone = []
    for i in range(8):
        p = plan(loaded, i)
        alone.append(outcome(p, llm.generate(loaded, p, threading.Event())))
    assert scheduler_of(loaded).peak == 1
    batched = together(loaded, [plan(loaded, i) for i in range(8)])
    assert scheduler_of(loaded).peak >= 4  # they did share decode forwards
    assert batched == alone
    assert len({tuple(a[0][0]) for a in alone}) == 8  # eight different texts, not one repeated token


def test_the_batch_computes_what_the_model_computes(folder):
    """Chunked prefill and per-row attention are the model's own attention: greedy tokens equal HF `generate`'s and
    every logprob equals a plain forward over the whole text (to float rounding)."""
    loaded = deployment(folder, prefill_chunk=5)
    p = plan(loaded, 3, temperature=0.0, max_tokens=20)
    done = llm.generate(loaded, p, threading.Event())
    model, ids = loaded.llm.model, torch.tensor([p.prompts[0]])
    hf = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :]
    assert done[0].token_ids == hf.tolist()[: len(done[0].token_ids)]
    with torch.no_grad():
        logits = model(torch.cat([ids[0], hf])[None]).logits[0, ids.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits.double(), -1).gather(1, hf[:, None])[: len(p.logprobs[0]), 0]
    assert torch.allclose(torch.tensor([r.logprob for r in p.logprobs[0]], dtype=torch.double), expected, atol=1e-4)


def test_every_choice_of_n_is_a_sequence_of_the_batch(folder):
    loaded = deployment(folder)
    p = plan(loaded, 0, n=4, max_tokens=12)
    done = llm.generate(loaded, p, threading.Event())
    assert scheduler_of(loaded).peak == 4 and len(done) == 4
    # choice i is seeded seed + i, exactly as the per-request path seeds it
    alone = [outcome(q, llm.generate(loaded, q, threading.Event())) for q in [plan(loaded, 0, max_tokens=12)]]
    assert outcome(p, done)[0] == alone[0][0]
    assert llm.usage(p, done)["serving"] == {"path": "batch", "reason": None}


def test_a_joining_prompt_prefills_one_chunk_per_decode_step(folder, monkeypatch):
    loaded = deployment(folder, prefill_chunk=2)
    steps: list[str] = []
    prefill, decode = Scheduler._prefill_chunk, Scheduler._decode
    # P: a chunk prefilled while others decode (p: while none do), D: a decode step
    monkeypatch.setattr(
        Scheduler, "_prefill_chunk", lambda self, seq: (steps.append("P" if self._running else "p"), prefill(self, seq))
    )
    monkeypatch.setattr(Scheduler, "_decode", lambda self: (steps.append("D"), decode(self)))
    running = threading.Event()
    first = plan(loaded, 2, max_tokens=150)
    first.params = dataclasses.replace(first.params, stop_token_ids=frozenset())  # it decodes through the prefill
    runner = threading.Thread(
        target=llm.generate, args=(loaded, first, threading.Event()), kwargs={"on_delta": lambda i, d: running.set()}
    )
    runner.start()
    assert running.wait(30)
    long_prompt = plan(loaded, 6, max_tokens=2)  # ~40 prompt tokens: ~20 chunks
    llm.generate(loaded, long_prompt, threading.Event())
    runner.join(60)
    trace = "".join(steps)
    assert trace.count("P") >= 10 and "PP" not in trace  # the running sequence decoded between every two chunks


def test_an_aborted_sequence_leaves_and_the_others_finish_as_alone(folder):
    loaded = deployment(folder)
    alone = [outcome(p, llm.generate(loaded, p, threading.Event())) for p in [plan(loaded, 1), plan(loaded, 3)]]
    abort, gone = threading.Event(), []

    def leave(index: int, delta: str) -> None:
        abort.set()  # the client hangs up at its first text

    victim = plan(loaded, 5, max_tokens=200)
    thread = threading.Thread(target=lambda: gone.extend(llm.generate(loaded, victim, abort, on_delta=leave)))
    thread.start()
    assert together(loaded, [plan(loaded, 1), plan(loaded, 3)]) == alone
    thread.join(30)
    assert gone[0].finish_reason == "abort" and len(gone[0].token_ids) < 200


def test_engine_options_that_cannot_batch_run_per_request_and_say_so(folder):
    for engine, why in [
        ({"kv_cache": "ems", "kv_cache_options": {"budget": 16}}, "kv_cache ems"),
        ({"attention": "hip"}, "attention hip"),
        ({"attention": "hyperattention"}, "attention hyperattention"),
    ]:
        loaded = deployment(folder, **engine)
        p = plan(loaded, 1, logprobs=None, max_tokens=4)
        done = llm.generate(loaded, p, threading.Event())
        serving = llm.usage(p, done)["serving"]
        assert serving["path"] == "per-request" and serving["reason"].startswith(why) and len(done[0].token_ids) == 4
        assert "scheduler" not in loaded.derived  # the batch never saw it


def test_a_per_request_generation_runs_between_batch_steps(folder):
    loaded = deployment(folder)
    batched = plan(loaded, 1, max_tokens=150)
    batched.params = dataclasses.replace(batched.params, stop_token_ids=frozenset())  # no early end-of-text
    running, finished = threading.Event(), []
    thread = threading.Thread(
        target=lambda: finished.extend(
            llm.generate(loaded, batched, threading.Event(), on_delta=lambda i, d: running.set())
        )
    )
    thread.start()
    assert running.wait(30)
    ems = plan(
        loaded, 3, logprobs=None, max_tokens=4, engine_override={"kv_cache": "ems", "kv_cache_options": {"budget": 16}}
    )
    done = llm.generate(loaded, ems, threading.Event())
    assert llm.usage(ems, done)["serving"]["path"] == "per-request" and len(done[0].token_ids) == 4
    assert not finished  # it ran while the batch was still decoding
    thread.join(60)
    assert finished[0].finish_reason == "length" and len(finished[0].token_ids) == 150


def test_a_full_queue_refuses_before_queueing(folder):
    loaded = deployment(folder, max_batch_size=1, max_queue=1)
    scheduler = scheduler_of(loaded)
    held = [Sequence([1, 2, 3], plan(loaded, 0).params, torch.Generator()) for _ in range(2)]
    with loaded.lock:  # the scheduler cannot step: one sequence holds the batch's place, one waits
        scheduler.submit(held)
        with pytest.raises(QueueFull) as err:
            llm.check_room(loaded, plan(loaded, 1))
        for seq in held:
            seq.closed.set()
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"


def test_http_logprobs_queue_and_request_id(api, folder, caplog):
    import_zip(api, "shaken", zip_folder(folder))
    deploy(api, "batched", "shaken", max_batch_size=2, max_queue=2, max_n=8)
    body = {"model": "batched", "messages": [{"role": "user", "content": "def f"}], "max_tokens": 6, "seed": 0}
    with caplog.at_level("INFO", logger="crucible.api.serving"):
        r = api.post(
            "/v1/chat/completions",
            json={**body, "logprobs": True, "top_logprobs": 2},
            headers={"X-Request-ID": "trace-me-42"},
        )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-me-42"
    assert any("trace-me-42" in m for m in caplog.messages)
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    assert "".join(e["token"] for e in content).startswith(choice["message"]["content"][:1])
    # the streamed logprobs are the same tokens, delta by delta, and the usage chunk closes the stream
    with api.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}},
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = [e for c in chunks for ch in c["choices"] for e in (ch.get("logprobs") or {}).get("content", [])]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in content] and events[-1] == "[DONE]"
    assert chunks[-1]["usage"]["completion_tokens"] == len(content)
    # legacy completions: parallel lists
    r = api.post("/v1/completions", json={"model": "batched", "prompt": "def f", "max_tokens": 5, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    # more choices than the batch and its queue can ever hold: refused before anything queues
    r = api.post("/v1/chat/completions", json={**body, "n": 5})
    assert problem(r, 422)["errors"][0]["pointer"] == "/n"
    # a batch and queue that are full: 429 with Retry-After, before a stream starts
    manager = api.app.state.deployments
    loaded = manager.peek(manager.loaded_ids()[0])
    held = [Sequence([1, 2, 3], SamplingParams(max_tokens=4), torch.Generator()) for _ in range(4)]
    with loaded.lock:
        scheduler_of(loaded).submit(held)
        r = api.post("/v1/chat/completions", json={**body, "stream": True})
        for seq in held:
            seq.closed.set()
    assert problem(r, 429)["error"]["type"] == "rate_limit_error" and r.headers["Retry-After"] == "1"
