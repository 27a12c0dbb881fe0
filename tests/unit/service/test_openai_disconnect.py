"""A non-streamed completion whose client disconnects stops generating (the model's lock is freed)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from api.routes import openai_compat


def _run(coroutine):
    """Its own thread and event loop: other tests in the session may leave one running in this thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class _Request:
    def __init__(self, gone_after: int):
        self.polls, self.gone_after = 0, gone_after

    async def is_disconnected(self) -> bool:
        self.polls += 1
        return self.polls > self.gone_after


def _blocking_run(seen: dict):
    def run(loaded, p, abort: threading.Event):
        seen["abort"] = abort
        assert abort.wait(timeout=30), "generation was never told to stop"
        return ["partial"]

    return run


def test_a_disconnected_client_aborts_a_non_streamed_generation(monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(openai_compat.llm, "generate", _blocking_run(seen))
    request = _Request(gone_after=2)
    out = _run(openai_compat._generate(request, loaded=None, p=None, poll_s=0.01))
    assert out == ["partial"] and seen["abort"].is_set() and request.polls == 3


def test_a_connected_client_gets_the_whole_generation(monkeypatch):
    calls: list[bool] = []

    def run(loaded, p, abort):
        calls.append(abort.is_set())
        return ["whole"]

    monkeypatch.setattr(openai_compat.llm, "generate", run)
    assert _run(openai_compat._generate(_Request(gone_after=10**6), None, None, poll_s=0.01)) == ["whole"]
    assert calls == [False]
