"""Token-by-token generation for serving: temperature, nucleus (top-p), seed, stop, abort.

The serving engine needs what `model.generate` does not give it in one place: a token *iterator*
(so tokens stream out as SSE chunks while they are produced), a check between tokens that stops
work the moment a client disconnects, and stop strings matched on the decoded text. The decoding
itself is the textbook one: logits of the last position, divided by the temperature, truncated to
the smallest set of tokens whose probability reaches `top_p` (Holtzman et al. 2020, "The Curious
Case of Neural Text Degeneration", §3.1), sampled with a per-request `torch.Generator` so a seed
reproduces the same text. Temperature 0 is greedy (argmax), which a test checks against HF
`generate(do_sample=False)`. The KV cache is the model's own (transformers 5's `cache`), so each new
token costs one forward of one position, and only the last position goes through the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Completion:
    """One generated choice: its text, token ids and why it ended (`stop` | `length` | `abort`)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """End-of-sequence and end-of-turn ids: the chat model ends its reply with `<|end|>`."""
    from models.llm.tokenizer import END_OF_TURN

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab:
        ids.add(int(vocab[END_OF_TURN]))
    return frozenset(ids)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Sample one id from a [vocab] logit vector: greedy at temperature 0, else softmax(l/T) on the top-p nucleus."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is still below top_p (the first one always stays)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_tokens(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    should_abort: Callable[[], bool] = lambda: False,
) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token, `max_tokens`, or `should_abort()`.

    The stop token itself is not yielded. `should_abort` is checked before every forward pass, so a
    disconnected client costs at most one more token of compute.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    past = None
    for _ in range(params.max_tokens):
        if should_abort():
            return
        out = model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1)
        past = out.cache
        token = next_token(out.logits[0, -1].float().cpu(), params.temperature, params.top_p, generator)
        if token in params.stop_token_ids:
            return
        yield token
        ids = torch.tensor([[token]], dtype=torch.long, device=device)


def _earliest_stop(text: str, stops: Sequence[str]) -> int:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1


def stream_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    completion: Completion,
    should_abort: Callable[[], bool] = lambda: False,
    tokens: Iterable[int] | None = None,
) -> Iterator[str]:
    """Yield text deltas of one choice, filling `completion` as it goes.

    Text is decoded from all ids so far (BPE merges can change earlier characters only within a
    multi-byte character, so a delta is emitted once the decoded text no longer ends in U+FFFD).
    A stop string ends the choice and is not included; text that might be the start of a stop
    string is held back until it is known not to be one. `tokens`: ids another decoder produced (e.g.
    parallel prompt decoding), turned into text by the same rules.
    """
    emitted = 0
    hold = max((len(s) for s in params.stop), default=1) - 1
    completion.finish_reason = "length"
    source = tokens if tokens is not None else generate_tokens(model, prompt_ids, params, generator, should_abort)
    for token in source:
        completion.token_ids.append(token)
        text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        cut = _earliest_stop(text, params.stop)
        if cut >= 0:
            completion.text, completion.finish_reason = text[:cut], "stop"
            if cut > emitted:
                yield text[emitted:cut]
            return
        completion.text = text
        if text.endswith("\ufffd"):
            continue
        safe = len(text) - hold if params.stop else len(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if should_abort():
        completion.finish_reason = "abort"
    elif len(completion.token_ids) < params.max_tokens:
        completion.finish_reason = "stop"
    text = completion.text
    if len(text) > emitted and completion.finish_reason != "abort":
        yield text[emitted:]
