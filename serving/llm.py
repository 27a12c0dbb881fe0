"""The language-model engine behind the OpenAI-compatible routes: prompts, caps, choices, streaming.

A request becomes token ids (the tokenizer's chat template for chat, the raw text for completions) and is
checked against the deployment's caps, its queue and the model's context before anything is queued. Then
`generate` serves it on one of two paths, which `usage.serving` names:

- **batch** (the default): each choice joins the deployment's continuous batch (`serving.scheduler`) and
  a thread per choice turns its tokens into text deltas (stop strings, UTF-8 boundaries) as they come;
- **per-request**: engine options whose state cannot share a batch — EMS and MatryoshkaKV caches patch the
  model's attention for one request, PPD verifies a candidate tree with its own mask, HiP and
  HyperAttention prefill a whole prompt sparsely — generate choice by choice under the model's lock
  (`run`), taking the model between two of the batch's steps.

Either way an abort flag is checked between tokens, so a client that disconnects stops the work it asked for.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from threading import Event
from typing import Any

import torch

from models.llm.generation import Completion, SamplingParams, stop_token_ids, stream_text
from serving.engines import DEFAULT_REQUEST_TOKENS, kv_cache_config, model_context, request_engine
from serving.errors import ContextExceeded, InvalidField, PromptTooLong
from serving.loaded import Loaded
from serving.ppd import ppd_engine
from serving.templates import TemplateTimeout, render_with_deadline

MAX_STOPS = 4
OnDelta = Callable[[int, str], None] | None  # (choice index, text delta): the SSE stream's hook
OnFinish = Callable[[int, Completion], None] | None  # (choice index, the finished choice)
CHARS_PER_TOKEN = 64  # no tokenizer's token is longer: a text past context × this cannot fit, untokenised


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], timeout_s: float | None = None) -> str:
    """The tokenizer's chat template; a model without one gets plain `role: content` turns (the response says
    so: `usage.chat_template` and the `X-Chat-Template` header).

    The template came with an uploaded model, so it is rendered under a deadline (`timeout_s`) and its
    failures (a sandbox violation, `raise_exception`, a syntax error) are a 422 naming `/messages`."""
    if not has_chat_template(tokenizer):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    import jinja2

    def render() -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    try:
        return render() if timeout_s is None else render_with_deadline(render, timeout_s)
    except TemplateTimeout:
        raise InvalidField(
            "/messages",
            f"the model's chat template did not finish within {timeout_s:g} s (CRUCIBLE_TEMPLATE_TIMEOUT_S); "
            "fix the template in the model folder",
            slug="chat-template-timeout",
            title="The chat template took too long",
        ) from None
    except jinja2.TemplateError as exc:  # SecurityError, TemplateSyntaxError, the template's raise_exception
        raise InvalidField(
            "/messages",
            f"the model's chat template refused these messages ({type(exc).__name__}: {exc})",
            slug="chat-template-error",
            title="The chat template failed",
        ) from None


def request_tokens_cap(engine: dict[str, Any]) -> int:
    return int(engine.get("max_request_tokens", DEFAULT_REQUEST_TOKENS))


def check_request_size(engine: dict[str, Any], prompts: int, n: int, max_tokens: int, prompt_field: str) -> None:
    """prompts × n × max_tokens within the deployment's `max_request_tokens`, else a 422 naming the field."""
    cap = request_tokens_cap(engine)
    if prompts * n * max_tokens > cap:
        raise InvalidField(
            f"/{prompt_field}",
            f"{prompts} prompt(s) × n {n} × max_tokens {max_tokens} = {prompts * n * max_tokens} tokens; this "
            f"deployment generates at most {cap} per request (engine option max_request_tokens); "
            "send fewer prompts, a smaller n or max_tokens",
            slug="request-too-large",
            title="The request asks for too many tokens",
        )


def check_caps(engine: dict[str, Any], n: int, max_tokens: int | None) -> None:
    """`n` and `max_tokens` within the deployment's caps (which a request cannot override), else a 422 naming them."""
    most_n, most_tokens = engine.get("max_n"), engine.get("max_tokens_cap")
    if most_n is not None and n > most_n:
        raise InvalidField("/n", f"at most {most_n} choices per request on this deployment")
    if max_tokens is not None and most_tokens is not None and max_tokens > most_tokens:
        raise InvalidField("/max_tokens", f"at most {most_tokens} tokens on this deployment")


@dataclass
class Plan:
    """A validated request: prompt ids per prompt, `n` choices each, and the sampling parameters."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    seed: int | None
    kv_cache: str = "none"
    engine: dict[str, Any] = field(default_factory=dict)  # the deployment's engine with the request's overrides
    kv_bytes: int = 0  # the largest KV cache (bytes) any choice held at its end
    kv_bytes_dense: int = 0  # what an uncompressed cache of the same tokens would hold
    decoding: str = "standard"  # "ppd" when the deployment decodes with prompt tokens and the request is greedy
    accepted: list[int] = field(default_factory=list)  # PPD: tokens produced by each decoding forward
    tree_nodes: int | None = None  # PPD: guessed nodes verified per forward (the deployment's hardware-aware size)
    attention_path: str | None = None  # the prefill's path: "flex", "sdpa-tiles", "gather", "sdpa" (`usage.attention`)
    chat_template: str | None = None  # chat: "model" (the tokenizer's template) or "plain-fallback" (`role: content`)
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest alternatives
    path: str = "batch"  # "batch" (continuous batching) or "per-request" (`usage.serving`)
    path_reason: str | None = None  # why a request runs per request
    logprobs: list[list[Any]] = field(default_factory=list)  # per choice: its tokens' `TokenLogprob`s
    marks: list[list[int]] = field(default_factory=list)  # per choice: tokens behind each text delta streamed

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def plan(
    loaded: Loaded,
    texts: Sequence[str],
    prompt_field: str,
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    n: int,
    stop: str | Sequence[str] | None,
    seed: int | None,
    engine_override: dict[str, Any] | None = None,
    logprobs: int | None = None,
) -> Plan:
    """Token ids, sampling parameters and the request's engine, or the 4xx naming the field at fault."""
    assert loaded.llm is not None
    engine, tok = request_engine(loaded.engine, engine_override, loaded.llm.path), loaded.llm.tokenizer
    check_caps(engine, n, max_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise InvalidField("/stop", f"at most {MAX_STOPS} stop sequences")
    # before tokenising anything: every choice generates at least one token (or max_tokens when given)
    check_request_size(engine, len(texts), n, max_tokens or 1, prompt_field)
    context = loaded.context_length
    for t in texts:
        if len(t) > context * CHARS_PER_TOKEN:
            raise PromptTooLong(
                f"{prompt_field}: {len(t)} characters cannot fit this model's {context}-token context; shorten it",
                [{"pointer": f"/{prompt_field}", "message": f"{len(t)} characters"}],
            )
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise PromptTooLong(
            f"{prompt_field}: {longest} tokens; this model's context is {context} tokens, leaving none "
            "to generate; shorten the prompt",
            [{"pointer": f"/{prompt_field}", "message": f"{longest} tokens ≥ context {context}"}],
        )
    room = context - longest
    if max_tokens is None:
        max_tokens = min(engine["default_max_tokens"], room)
    elif max_tokens > room:
        raise ContextExceeded(
            f"max_tokens: the prompt has {longest} tokens and the context is {context}; ask for at most {room} tokens",
            [{"pointer": "/max_tokens", "message": f"at most {room} here"}],
        )
    check_request_size(engine, len(texts), n, max_tokens, prompt_field)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stops),
        stop_token_ids=stop_token_ids(tok),
    )
    kv_config(loaded, engine)  # a KV-cache option the model cannot take is a 4xx now, not an error mid-stream
    # PPD reproduces greedy decoding exactly; a sampled request decodes the standard way
    decoding = "ppd" if engine.get("decoding") == "ppd" and temperature == 0 else "standard"
    reason = per_request_reason(loaded, engine, decoding)
    if reason is None:
        check_queue_size(loaded.engine, len(prompts) * n)
    elif logprobs is not None:
        raise InvalidField(
            "/logprobs",
            f"logprobs come from the batched path, and this request runs per request ({reason}); drop logprobs "
            "or the engine option",
        )
    return Plan(
        prompts,
        n,
        params,
        seed,
        kv_cache=engine.get("kv_cache", "none"),
        engine=engine,
        decoding=decoding,
        top_logprobs=logprobs,
        path="batch" if reason is None else "per-request",
        path_reason=reason,
    )


def per_request_reason(loaded: Loaded, engine: dict[str, Any], decoding: str) -> str | None:
    """Why a request cannot join the deployment's batch (None: it can)."""
    from serving.rows import batchable

    assert loaded.llm is not None
    if engine.get("kv_cache", "none") != "none":
        return f"kv_cache {engine['kv_cache']}: its compressed cache patches the model's attention per request"
    if decoding == "ppd":
        return "decoding ppd: its candidate tree is verified with a mask of its own"
    if loaded.engine.get("attention", "sdpa") != "sdpa":
        return f"attention {loaded.engine['attention']}: its sparse prefill runs over the whole prompt"
    return batchable(loaded.llm.model)


def check_queue_size(engine: dict[str, Any], sequences: int) -> None:
    """A request with more choices than the batch and its queue together can ever hold is refused now (422),
    not left to wait for room that never comes."""
    most = int(engine.get("max_batch_size", 8)) + int(engine.get("max_queue", 64))
    if sequences > most:
        raise InvalidField(
            "/n",
            f"prompts × n = {sequences} sequences; this deployment's batch and queue hold {most} "
            "(engine options max_batch_size, max_queue); send fewer prompts or a smaller n",
            slug="request-too-large",
            title="The request asks for too many tokens",
        )


def kv_config(loaded: Loaded, engine: dict[str, Any] | None = None) -> Any:
    """The checked KV-cache config of the deployment's engine (read once per warm model, as a projection comes
    from its folder, and kept with it) or of a request's overridden one (read per request: requests may ask
    for any budget, and a cache per distinct ask would grow without bound)."""
    assert loaded.llm is not None
    folder = loaded.llm.path
    if engine is not None and engine is not loaded.engine:
        return kv_cache_config(engine, folder, model_context(folder))
    if "kv_config" not in loaded.derived:
        loaded.derived["kv_config"] = kv_cache_config(loaded.engine, folder, model_context(folder))
    return loaded.derived["kv_config"]


def check_room(loaded: Loaded, p: Plan) -> None:
    """QueueFull (a 429) when the deployment's batch queue has no room for this request's choices now, so a client
    hears it before its stream starts (the scheduler checks again, atomically, when the choices are queued)."""
    from serving.scheduler import scheduler_of

    if p.path == "batch":
        scheduler_of(loaded).room(len(p.prompts) * p.n)


def seed_base(p: Plan) -> int:
    """Choice i of the request samples with seed base + i: the request's seed, or a random one."""
    return p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())


def generate(
    loaded: Loaded, p: Plan, abort: Event, on_delta: OnDelta = None, on_finish: OnFinish = None
) -> list[Completion]:
    """Every choice of the request (index = prompt × n + i), on the path `plan` chose; stops early on `abort`."""
    if p.path == "per-request":
        return run(loaded, p, abort, on_delta, on_finish)
    return _batched(loaded, p, abort, on_delta, on_finish)


def _batched(
    loaded: Loaded, p: Plan, abort: threading.Event, on_delta: OnDelta, on_finish: OnFinish
) -> list[Completion]:
    """The choices join the deployment's continuous batch; one thread per choice turns its tokens into text."""
    from models.llm.kv_cache.cache import dense_kv_bytes
    from serving.scheduler import Sequence, scheduler_of

    assert loaded.llm is not None
    base = seed_base(p)
    sequences = [
        Sequence(ids, p.params, torch.Generator().manual_seed(base + k * p.n + i), top_logprobs=p.top_logprobs)
        for k, ids in enumerate(p.prompts)
        for i in range(p.n)
    ]
    p.logprobs, p.marks = [s.logprobs for s in sequences], [[] for _ in sequences]
    scheduler_of(loaded).submit(sequences)
    completions = [Completion() for _ in sequences]
    errors: list[BaseException] = []

    def consume(index: int) -> None:
        seq, completion = sequences[index], completions[index]
        assert loaded.llm is not None
        try:
            tokens = seq.stream(abort.is_set)
            for delta in stream_text(
                loaded.llm.model,
                loaded.llm.tokenizer,
                seq.prompt,
                p.params,
                seq.generator,
                completion,
                abort.is_set,
                tokens,
            ):
                p.marks[index].append(len(completion.token_ids))
                if on_delta is not None:
                    on_delta(index, delta)
            if seq.error is not None:
                raise seq.error
            if on_finish is not None:
                on_finish(index, completion)
        except BaseException as exc:  # raised on the request's thread below
            errors.append(exc)
        finally:
            seq.closed.set()  # a stop string or an abort: the sequence leaves the batch at the next step

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(1, len(sequences))]
    for t in threads:
        t.start()
    consume(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    dense = max(dense_kv_bytes(loaded.llm.model.config, s.cached, dtype=loaded.llm.model.dtype) for s in sequences)
    p.kv_bytes, p.kv_bytes_dense, p.attention_path = dense, dense, "sdpa"
    return completions


def _ppd_tokens(loaded: Loaded, p: Plan, ids: list[int]) -> list[int]:
    from models.llm.parallel_prompt import ppd_generate

    assert loaded.llm is not None
    engine = ppd_engine(loaded)
    result = ppd_generate(
        loaded.llm.model, engine.prompts, ids, p.params.max_tokens, p.params.stop_token_ids, tree=engine.tree
    )
    p.accepted.extend(result.accepted)
    p.tree_nodes = engine.tree_nodes
    return result.tokens


def _account(loaded: Loaded, p: Plan, caches: list[Any], tokens: int) -> None:
    from models.llm.kv_cache.cache import dense_kv_bytes, kv_bytes

    assert loaded.llm is not None
    model = loaded.llm.model
    if caches:
        p.kv_bytes = max(p.kv_bytes, kv_bytes(caches[-1]))
        # the tokens the cache has seen: the last token generated is never fed back, so counting the prompt and
        # every generated token would make a dense cache look smaller than a dense cache (a ratio below 1)
        tokens = int(caches[-1].get_seq_length()) or tokens
    p.kv_bytes_dense = max(p.kv_bytes_dense, dense_kv_bytes(model.config, tokens, dtype=model.dtype))


def run(
    loaded: Loaded,
    p: Plan,
    abort: threading.Event,
    on_delta: OnDelta = None,
    on_finish: OnFinish = None,
) -> list[Completion]:
    """Generate every choice (index = prompt × n + i) under the model's lock; stops early on `abort`."""
    from models.llm.attention.kit import prefill_path

    assert loaded.llm is not None
    me = object()
    loaded.waiters.append(me)
    try:
        while not loaded.lock.acquire(timeout=0.05):
            if abort.is_set():
                return []
    finally:
        loaded.waiters.remove(me)
    try:
        with contextlib.ExitStack() as stack:
            if p.engine.get("attention", "sdpa") != loaded.engine.get("attention", "sdpa"):
                stack.enter_context(exact_attention(loaded.llm.model))
            name = loaded.llm.model.config._attn_implementation
            prefill_path(name, clear=True)  # what this request's prefills do, not an earlier request's
            try:
                return _generate_all(loaded, p, abort, on_delta, on_finish)
            finally:  # a sparse deployment's prefills record their path; exact attention is "sdpa"
                exact = p.engine.get("attention", "sdpa") == "sdpa"
                p.attention_path = prefill_path(name) or ("sdpa" if exact else None)
    finally:
        loaded.lock.release()


def _generate_all(
    loaded: Loaded, p: Plan, abort: threading.Event, on_delta: OnDelta, on_finish: OnFinish
) -> list[Completion]:
    from models.llm.kv_cache.session import kv_session

    assert loaded.llm is not None
    config = kv_config(loaded, p.engine or None)
    compression = (
        {"press": config} if p.kv_cache == "ems" else {"projection": config} if p.kv_cache == "matryoshka-kv" else {}
    )
    out: list[Completion] = []
    base = seed_base(p)
    for k, ids in enumerate(p.prompts):
        for i in range(p.n):
            index = k * p.n + i
            completion = Completion()
            generator = torch.Generator().manual_seed(base + index)
            with kv_session(loaded.llm.model, **compression) as caches:
                # PPD decodes the whole choice (fewer forwards, greedy's exact tokens), then streams its text
                tokens = _ppd_tokens(loaded, p, ids) if p.decoding == "ppd" else None
                for delta in stream_text(
                    loaded.llm.model, loaded.llm.tokenizer, ids, p.params, generator, completion, abort.is_set, tokens
                ):
                    if on_delta is not None:
                        on_delta(index, delta)
            _account(loaded, p, caches, len(ids) + len(completion.token_ids))
            out.append(completion)
            if on_finish is not None:
                on_finish(index, completion)
            if abort.is_set():
                return out
    return out


@contextlib.contextmanager
def exact_attention(model: Any) -> Iterator[None]:
    """Exact SDPA for one request on a sparse-attention deployment (the caller holds the model's lock, so no
    other request sees the switch), then the deployment's registered attention again."""
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def usage(p: Plan, completions: Sequence[Completion]) -> dict[str, Any]:
    """OpenAI's token counts plus a `kv_cache` extension (the engine's KV compression, the largest cache a choice
        held in bytes, what a dense cache of the same tokens holds, their ratio) and a `decoding` one (standard or
        ppd, with PPD's decoding forwards after the prefills, tokens accepted per forward and the candidate tree's
        guessed nodes per forward), the `attention` (its type, and the path its prefills took: "flex" for
        FlexAttention tiles, "sdpa-tiles" for the same tiles through SDPA's fused CPU kernel, "gather" for the
        pure-torch fallback, "sdpa" for exact attention); for chat, `chat_template` says whether the model's template
        or the plain `role: content` fallback (a model without a template) made the prompt; `serving` names the path
    that served it ("batch" or "per-request", with the reason)."""
    done = sum(len(c.token_ids) for c in completions)
    kv = {
        "type": p.kv_cache,
        "bytes": p.kv_bytes,
        "dense_bytes": p.kv_bytes_dense,
        "ratio": round(p.kv_bytes / p.kv_bytes_dense, 6) if p.kv_bytes_dense else None,
    }
    decoding = {
        "type": p.decoding,
        "forward_passes": len(p.accepted) or None,
        "accepted_tokens_per_step": round(sum(p.accepted) / len(p.accepted), 4) if p.accepted else None,
        "tree_nodes": p.tree_nodes,
    }
    return {
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": p.prompt_tokens + done,
        "kv_cache": kv,
        "decoding": decoding,
        "attention": {"type": p.engine.get("attention", "sdpa"), "path": p.attention_path},
        "serving": {"path": p.path, "reason": p.path_reason},
        **({"chat_template": p.chat_template} if p.chat_template else {}),
    }
