"""OpenAI's two `logprobs` shapes, made from the engine's per-token records (`serving.scheduler.TokenLogprob`).

`Logprobs` serves one request: whole per choice, or per streamed text delta.

Chat completions carry `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`; legacy
completions carry parallel lists (`tokens`, `token_logprobs`, `top_logprobs` as token → logprob maps,
`text_offset`). A token's text is its own decoding, so multi-byte characters split over tokens show as
partial bytes, as OpenAI's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.llm.generation import Completion
from serving.llm import Plan
from serving.loaded import Loaded


def _text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = _text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, records: Sequence[Any]) -> dict[str, Any]:
    """A chat choice's (or a streamed delta's) `logprobs` object."""
    return {
        "content": [
            {**_entry(tokenizer, r.token, r.logprob), "top_logprobs": [_entry(tokenizer, t, lp) for t, lp in r.top]}
            for r in records
        ]
    }


def completion_logprobs(tokenizer: Any, records: Sequence[Any], offset: int = 0) -> dict[str, Any]:
    """A completion choice's `logprobs` object; `offset` is where its text starts (after an echoed prompt)."""
    tokens = [_text(tokenizer, r.token) for r in records]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [r.logprob for r in records],
        "top_logprobs": [{_text(tokenizer, t): lp for t, lp in r.top} for r in records],
        "text_offset": offsets,
    }


class Logprobs:
    """A request's `logprobs` in OpenAI's shapes, whole per choice or per streamed text delta (the engine marks how
    many tokens of a choice each delta covers, in the order the deltas reach the stream)."""

    def __init__(self, p: Plan, tokenizer: Any) -> None:
        self.p, self.tokenizer = p, tokenizer
        self.deltas: dict[int, int] = {}
        self.tokens: dict[int, int] = {}

    @classmethod
    def of(cls, p: Plan, loaded: Loaded) -> Logprobs | None:
        """None when the request asked for no logprobs."""
        return None if p.top_logprobs is None or loaded.llm is None else cls(p, loaded.llm.tokenizer)

    def delta(self, index: int) -> list[Any]:
        k = self.deltas.get(index, 0)
        self.deltas[index] = k + 1
        start, end = self.tokens.get(index, 0), self.p.marks[index][k]
        self.tokens[index] = end
        return self.p.logprobs[index][start:end]

    def choice(self, index: int, c: Completion) -> list[Any]:
        return self.p.logprobs[index][: len(c.token_ids)]

    def chat(self, records: list[Any]) -> dict[str, Any]:
        return chat_logprobs(self.tokenizer, records)

    def completion(self, records: list[Any], offset: int = 0) -> dict[str, Any]:
        return completion_logprobs(self.tokenizer, records, offset)
