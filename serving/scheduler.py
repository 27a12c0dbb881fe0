"""Continuous batching: one scheduler per LLM deployment, one decode batch shared by every request.

Each choice of each request is a `Sequence` with its own state: prompt ids, sampling parameters, a
`torch.Generator` seeded for it, its KV cache (`serving.rows.RowKV`), its token queue and a `closed` flag.
The scheduler's thread loops over steps, each under the model's lock (so a per-request generation — EMS,
MatryoshkaKV, PPD, sparse prefill — takes the model between two steps and the batch waits for it):

1. sequences waiting in the queue join while the batch has room (`max_batch_size`);
2. one chunk (`prefill_chunk` tokens) of one joining sequence's prompt is prefilled, so a long prompt
   stalls the running sequences for at most one chunk; its last chunk samples the sequence's first token;
3. every running sequence decodes one token in one forward, sampled row by row with its own temperature,
   top-p and generator; a stop token or `max_tokens` ends a sequence, which leaves the batch at once.

Stop strings and disconnects are seen by the request's side (which turns tokens into text): it sets `closed`
and the sequence leaves at the next token boundary. The queue holds at most `max_queue` sequences; past
that `submit` raises `QueueFull` (a 429 with Retry-After). The thread exists while there is work and ends
when the batch and queue are empty, so an evicted deployment's scheduler does not keep its model alive.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from models.llm.generation import SamplingParams, next_token
from serving.errors import QueueFull
from serving.loaded import Loaded
from serving.rows import RowKV, StepCache, forward, rows_attention_on

END = None  # what a sequence's token queue carries after its last token


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and top-p) and the top
    alternatives', as OpenAI's `logprobs` reports them."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sequence:
    """One choice being generated: what it was asked, what it holds, how its consumer hears of its tokens."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    top_logprobs: int | None = None  # None: no logprobs; k ≥ 0: the chosen token's and the top k
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: queue.SimpleQueue[int | None] = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)  # the consumer stopped listening
    kv: RowKV | None = None
    prefilled: int = 0
    generated: int = 0
    last: int = 0  # the last sampled token: the next decode step's input
    cached: int = 0  # tokens its KV cache held when it ended (the usage's `kv_cache` bytes)
    error: BaseException | None = None  # why the scheduler ended it early, if a forward failed

    def stream(self, should_abort: Any, poll_s: float = 0.05) -> Iterator[int]:
        """The tokens as the scheduler samples them; ends after the last, or when `should_abort()` turns true."""
        while True:
            try:
                token = self.tokens.get(timeout=poll_s)
            except queue.Empty:
                if should_abort():
                    self.closed.set()
                    return
                continue
            if token is END:
                return
            yield token


def _sample(seq: Sequence, logits: torch.Tensor) -> int:
    logits = logits.float().cpu()
    token = next_token(logits, seq.params.temperature, seq.params.top_p, seq.generator)
    if seq.top_logprobs is not None:
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(logprobs, seq.top_logprobs) if seq.top_logprobs else None
        alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        seq.logprobs.append(TokenLogprob(token, float(logprobs[token]), alternatives))
    return token


class Scheduler:
    """The decode batch of one deployment (see the module's docstring for a step)."""

    def __init__(self, loaded: Loaded) -> None:
        assert loaded.llm is not None
        self.loaded = loaded
        self.model = loaded.llm.model
        engine = loaded.engine
        self.max_batch = int(engine.get("max_batch_size", 8))
        self.chunk = int(engine.get("prefill_chunk", 128))
        self.max_queue = int(engine.get("max_queue", 64))
        self._lock = threading.Lock()  # guards the queue and the loop's thread
        self._waiting: deque[Sequence] = deque()
        self._joining: list[Sequence] = []
        self._running: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode forwards run
        self.peak = 0  # the most sequences one decode forward served (what a test reads to see them share it)

    def room(self, asked: int) -> None:
        """Raise QueueFull when `asked` more sequences would not fit the queue now."""
        with self._lock:
            self._check_room(asked)

    def _check_room(self, asked: int) -> None:
        free = self.max_batch - len(self._joining) - len(self._running)
        if len(self._waiting) + asked - max(free, 0) > self.max_queue:
            raise QueueFull(len(self._waiting), self.max_queue, asked)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences (all or none: QueueFull when they do not fit) and make sure the loop runs."""
        with self._lock:
            self._check_room(len(sequences))
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="crucible-scheduler", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._waiting = deque(s for s in self._waiting if not s.closed.is_set())
                while self._waiting and len(self._joining) + len(self._running) < self.max_batch:
                    self._joining.append(self._waiting.popleft())
                if not self._joining and not self._running:
                    self._thread = None  # idle: the next submit starts a new loop
                    return
            while self.loaded.waiters:  # a per-request generation takes the model first (it then holds it whole)
                time.sleep(0.001)
            try:
                with self.loaded.lock, rows_attention_on(self.model), torch.inference_mode():
                    self._step()
            except BaseException as exc:  # a failed forward ends every sequence it held, not the server
                self._fail(exc)

    def _step(self) -> None:
        self._joining = [s for s in self._joining if not self._leave_if_closed(s)]
        self._running = [s for s in self._running if not self._leave_if_closed(s)]
        if self._joining:
            self._prefill_chunk(self._joining[0])
        if self._running:
            self._decode()

    def _leave_if_closed(self, seq: Sequence) -> bool:
        if seq.closed.is_set():
            self._release(seq)  # its cache goes now, not when the request's thread lets go of the sequence
            return True
        return False

    def _release(self, seq: Sequence) -> None:
        if seq.kv is not None:
            seq.cached, seq.kv = seq.kv.length, None

    def _prefill_chunk(self, seq: Sequence) -> None:
        model, device = self.model, self.model.device
        if seq.kv is None:
            capacity = len(seq.prompt) + seq.params.max_tokens
            seq.kv = RowKV(model.config, capacity, model.dtype, device)
        start, end = seq.prefilled, min(seq.prefilled + self.chunk, len(seq.prompt))
        ids = torch.tensor([seq.prompt[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device)[None]
        logits = forward(model, StepCache([seq.kv]), ids, positions)
        seq.prefilled = end
        if end == len(seq.prompt):
            self._joining.remove(seq)
            if self._emit(seq, _sample(seq, logits[0])):
                self._running.append(seq)

    def _decode(self) -> None:
        """One token for every running sequence, in a forward of exactly `max_batch` rows (see serving.rows)."""
        device = self.model.device
        rows: list[Sequence | None] = [*self._running, *[None] * (self.max_batch - len(self._running))]
        ids = torch.tensor([[s.last if s else 0] for s in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[s.kv.length if s and s.kv else 0] for s in rows], device=device)
        logits = forward(self.model, StepCache([s.kv if s else None for s in rows]), ids, positions)
        self.steps, self.peak = self.steps + 1, max(self.peak, len(self._running))
        self._running = [s for i, s in enumerate(self._running) if self._emit(s, _sample(s, logits[i]))]

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand the token to the consumer; False when the sequence has ended (stop token or max_tokens)."""
        if token in seq.params.stop_token_ids:
            return self._end(seq)
        seq.tokens.put(token)
        seq.last, seq.generated = token, seq.generated + 1
        if seq.generated >= seq.params.max_tokens:
            return self._end(seq)
        return True

    def _end(self, seq: Sequence) -> bool:
        seq.tokens.put(END)
        self._release(seq)
        return False

    def _fail(self, exc: BaseException) -> None:
        for seq in [*self._joining, *self._running]:
            seq.error = exc
            self._end(seq)
        self._joining, self._running = [], []


_schedulers_lock = threading.Lock()


def scheduler_of(loaded: Loaded) -> Scheduler:
    """The deployment's scheduler, made on its first batched request (kept with the warm model)."""
    with _schedulers_lock:
        if "scheduler" not in loaded.derived:
            loaded.derived["scheduler"] = Scheduler(loaded)
        return loaded.derived["scheduler"]
