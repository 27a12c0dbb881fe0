"""The language-model engine behind the OpenAI-compatible routes: prompts, caps, choices, streaming.

A request becomes token ids (the tokenizer's chat template for chat, the raw text for completions),
is checked against the deployment's caps and the model's context, and is generated choice by
choice under the model's lock in a worker thread. The thread checks an abort flag between tokens
and while waiting for the lock, so a client that disconnects stops the work it asked for; text
deltas are handed to a callback (the SSE stream) as they are produced.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from api.offload import TemplateTimeout, render_with_deadline
from api.problems import Problem, field_problem
from api.serving.engines import DEFAULT_REQUEST_TOKENS, kv_cache_config, model_context, request_engine
from api.serving.loaded import Loaded
from api.serving.ppd import ppd_engine
from models.llm.generation import Completion, SamplingParams, stop_token_ids, stream_text

MAX_STOPS = 4
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
        raise field_problem(
            "/messages",
            f"the model's chat template did not finish within {timeout_s:g} s (CRUCIBLE_TEMPLATE_TIMEOUT_S); "
            "fix the template in the model folder",
            slug="chat-template-timeout",
            title="The chat template took too long",
        ) from None
    except jinja2.TemplateError as exc:  # SecurityError, TemplateSyntaxError, the template's raise_exception
        raise field_problem(
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
        raise field_problem(
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
        raise field_problem("/n", f"at most {most_n} choices per request on this deployment")
    if max_tokens is not None and most_tokens is not None and max_tokens > most_tokens:
        raise field_problem("/max_tokens", f"at most {most_tokens} tokens on this deployment")


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
) -> Plan:
    """Token ids, sampling parameters and the request's engine, or the 4xx naming the field at fault."""
    assert loaded.llm is not None
    engine, tok = request_engine(loaded.engine, engine_override, loaded.llm.path), loaded.llm.tokenizer
    check_caps(engine, n, max_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise field_problem("/stop", f"at most {MAX_STOPS} stop sequences")
    # before tokenising anything: every choice generates at least one token (or max_tokens when given)
    check_request_size(engine, len(texts), n, max_tokens or 1, prompt_field)
    context = loaded.context_length
    for t in texts:
        if len(t) > context * CHARS_PER_TOKEN:
            raise Problem(
                400,
                "prompt-too-long",
                "The prompt does not fit the model's context",
                f"{prompt_field}: {len(t)} characters cannot fit this model's {context}-token context; shorten it",
                errors=[{"pointer": f"/{prompt_field}", "message": f"{len(t)} characters"}],
            )
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise Problem(
            400,
            "prompt-too-long",
            "The prompt does not fit the model's context",
            f"{prompt_field}: {longest} tokens; this model's context is {context} tokens, leaving none "
            "to generate; shorten the prompt",
            errors=[{"pointer": f"/{prompt_field}", "message": f"{longest} tokens ≥ context {context}"}],
        )
    room = context - longest
    if max_tokens is None:
        max_tokens = min(engine["default_max_tokens"], room)
    elif max_tokens > room:
        raise Problem(
            400,
            "context-exceeded",
            "Prompt plus max_tokens exceed the context",
            f"max_tokens: the prompt has {longest} tokens and the context is {context}; ask for at most {room} tokens",
            errors=[{"pointer": "/max_tokens", "message": f"at most {room} here"}],
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
    return Plan(prompts, n, params, seed, kv_cache=engine.get("kv_cache", "none"), engine=engine, decoding=decoding)


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
    on_delta: Callable[[int, str], None] | None = None,
    on_finish: Callable[[int, Completion], None] | None = None,
) -> list[Completion]:
    """Generate every choice (index = prompt × n + i) under the model's lock; stops early on `abort`."""
    from models.llm.attention.kit import prefill_path

    assert loaded.llm is not None
    while not loaded.lock.acquire(timeout=0.05):
        if abort.is_set():
            return []
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
    loaded: Loaded,
    p: Plan,
    abort: threading.Event,
    on_delta: Callable[[int, str], None] | None,
    on_finish: Callable[[int, Completion], None] | None,
) -> list[Completion]:
    from models.llm.kv_cache.session import kv_session

    assert loaded.llm is not None
    config = kv_config(loaded, p.engine or None)
    compression = (
        {"press": config} if p.kv_cache == "ems" else {"projection": config} if p.kv_cache == "matryoshka-kv" else {}
    )
    out: list[Completion] = []
    base = p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
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
    or the plain `role: content` fallback (a model without a template) made the prompt."""
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
        **({"chat_template": p.chat_template} if p.chat_template else {}),
    }
