"""OpenAI-compatible routes on the project's deployments: models, completions, chat, images.

`model` in a request is a deployment name. Errors are our problem bodies with the status codes the
`openai` client maps to its exceptions (401 AuthenticationError, 404 NotFoundError, 400
BadRequestError, 422 UnprocessableEntityError, 429 RateLimitError). Streaming is server-sent events
of `chat.completion.chunk` / `text_completion` objects ending with `data: [DONE]`; if the client
goes away the generation's abort flag is set, streamed or not (the request guard is pure ASGI, so
`request.is_disconnected()` sees the server's disconnect), and the model is free for the next request.

Templating and tokenising run on the app's bounded blocking pool, never on the event loop; each prompt
of a request counts against the inference rate limits, and prompts × n × max_tokens against the
deployment's `max_request_tokens`. Generation joins the deployment's continuous batch (or its
per-request path, which `usage.serving` names); a full batch queue is a 429 with Retry-After, said before
a stream starts. `logprobs` / `top_logprobs` come back in OpenAI's shapes, and every served request is
logged under its `X-Request-ID`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.auth import InferenceLimitDep, PrincipalDep, charge
from api.deps import SessionDep, SettingsDep, StoreDep
from api.logprobs import Logprobs
from api.openapi import errors
from api.problems import Problem, field_problem
from api.routes.deployments import (
    MAX_INT,
    ImageRequest,
    acquire,
    admission,
    check_admission,
    find_deployment,
    generate_images,
    native_size,
    release,
    warm,
)
from api.schemas import json_numbers
from models.llm.generation import Completion
from serving import llm
from serving.errors import QueueFull
from serving.manager import Loaded
from workers.tables import Deployment

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("crucible.api.serving")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """Fields shared by completions and chat; unknown OpenAI fields are ignored, as clients send many."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=64, description="a deployment name (see GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="the deployment's max_tokens_cap caps it")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="max_tokens' newer name")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_INT, description="choices per prompt; the deployment's max_n caps it")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: StrictBool = False
    _numbers = json_numbers("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed")
    stream_options: StreamOptions | None = None
    engine: dict[str, Any] | None = Field(
        None,
        description="Crucible extension (OpenAI SDKs: extra_body={'engine': {...}}): this request's engine "
        "options over the deployment's — kv_cache and kv_cache_options, decoding, attention "
        "('sdpa' turns a sparse-attention deployment's off for this request); usage reports what ran",
        json_schema_extra={"examples": [{"kv_cache": "ems", "kv_cache_options": {"budget": 64}}]},
    )


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    logprobs: StrictBool = Field(False, description="each generated token's log-probability in `choices[].logprobs`")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="the likeliest alternatives per token (logprobs)")

    def logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise field_problem("/top_logprobs", "set logprobs to true to get top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(..., description="text, or a list of texts (each gets `n` choices)")
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of each token and of its k likeliest")

    def logprobs_asked(self) -> int | None:
        return self.logprobs


def _llm(session: Any, who: Any, name: str) -> Deployment:
    return find_deployment(session, who.project, name, kind="llm", pointer="/model")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _stream_response(
    request: Request,
    loaded: Loaded,
    p: llm.Plan,
    body: Sampling,
    head: dict[str, Any],
    make_chunk: Any,
    last: dict[str, Any],
) -> StreamingResponse:
    """SSE of `make_chunk(index, delta)` chunks, a closing chunk per choice (`last` + finish_reason), the
    usage chunk when `stream_options.include_usage`, then `data: [DONE]`."""

    def final(index: int, c: Completion) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, **last, "finish_reason": c.finish_reason}]}

    def usage_chunk(u: dict[str, int]) -> dict[str, Any]:
        return {**head, "choices": [], "usage": u}

    include = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(
        _stream(request, loaded, p, make_chunk, final, usage_chunk if include else None),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _stream(
    request: Request,
    loaded: Loaded,
    p: llm.Plan,
    make_chunk: Any,
    final: Any,
    usage_chunk: Any,
    poll_s: float = 0.25,
) -> AsyncIterator[str]:
    """Run generation in a thread, forward its deltas as SSE; a disconnect aborts it, whether noticed while
    sending (the server raises) or while waiting for the next delta (polled, e.g. while the model is busy)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    abort = threading.Event()
    try:
        acquire(loaded, request.app.state.settings)
    except Problem as exc:  # the deployment filled up between the route's check and now
        yield sse(
            {"error": {"message": exc.detail, "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
        )
        yield "data: [DONE]\n\n"
        return

    def push(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    def work() -> None:
        try:
            done = llm.generate(
                loaded,
                p,
                abort,
                on_delta=lambda i, d: push("delta", (i, d)),
                on_finish=lambda i, c: push("finish", (i, c)),
            )
            push("end", done)
        except BaseException as exc:  # reported to the client as a last event
            push("error", exc)

    thread = threading.Thread(target=work, name="crucible-generate", daemon=True)
    thread.start()
    try:
        for first in make_chunk(None, None):
            yield sse(first)
        ended = False
        while not ended:
            try:
                events = [await asyncio.wait_for(queue.get(), poll_s)]
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            while not queue.empty():  # what else arrived meanwhile goes out in the same write
                events.append(queue.get_nowait())
            out: list[str] = []
            for kind, payload in events:
                if kind == "delta":
                    out += [sse(chunk) for chunk in make_chunk(*payload)]
                elif kind == "finish":
                    out.append(sse(final(*payload)))
                elif kind == "error":
                    out.append(sse({"error": _stream_error(payload)}))
                    ended = True
                    break
                else:
                    _log_served(request, p, payload)
                    if usage_chunk is not None:
                        out.append(sse(usage_chunk(llm.usage(p, payload))))
                    ended = True
                    break
            yield "".join(out)
        yield "data: [DONE]\n\n"
    finally:
        abort.set()
        release(loaded)


def _stream_error(exc: BaseException) -> dict[str, Any]:
    """The last event of a stream that failed: a full queue as OpenAI's rate-limit error, anything else a server's."""
    if isinstance(exc, QueueFull):
        return {"message": exc.detail, "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    message = f"{type(exc).__name__}: {exc}"
    return {"message": message, "type": "server_error", "param": None, "code": "server_error"}


def _log_served(request: Request, p: llm.Plan, done: list[Completion]) -> None:
    log.info(
        "request %s: %d prompt + %d completion tokens on the %s path",
        getattr(request.state, "request_id", "?"),
        p.prompt_tokens,
        sum(len(c.token_ids) for c in done),
        p.path,
    )


async def _generate(request: Request, loaded: Loaded, p: llm.Plan, poll_s: float = 0.25) -> list[Completion]:
    """A non-streamed generation that stops when its client goes away (as the streamed one does), so an
    abandoned request frees the model's lock instead of generating to max_tokens for nobody.

    It runs on a thread of its own (admission per deployment bounds how many), not the shared threadpool:
    requests waiting for a busy model must not hold the threads that health checks and reads need."""
    abort = threading.Event()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[Completion]] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (llm.generate(loaded, p, abort), None)
        except BaseException as exc:
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed meanwhile (the server stopped): no one is waiting
            pass

    async def watch() -> None:
        while not abort.is_set():
            if await request.is_disconnected():
                abort.set()
                return
            await asyncio.sleep(poll_s)

    watcher = asyncio.create_task(watch())
    threading.Thread(target=work, name="crucible-generate", daemon=True).start()
    try:
        return await done
    finally:
        abort.set()
        watcher.cancel()


def _plan(loaded: Loaded, body: ChatRequest | CompletionRequest, texts: list[str], field: str) -> llm.Plan:
    """The engine's plan of the request; a batch queue with no room for its choices is a 429 now."""
    p = llm.plan(
        loaded,
        texts,
        field,
        max_tokens=body.max_tokens or body.max_completion_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop,
        seed=body.seed,
        engine_override=body.engine,
        logprobs=body.logprobs_asked(),
    )
    llm.check_room(loaded, p)
    return p


async def _prepare(request: Request, row: Deployment, settings: Any, store: Any) -> Loaded:
    loaded = await run_in_threadpool(warm, request, row, settings, store)
    check_admission(loaded, settings)
    return loaded


def _charge_prompts(request: Request, who: Any, settings: Any, loaded: Loaded, body: Sampling, prompts: int) -> None:
    """Each prompt is a request to the rate limits (the route's dependency counted the first); the size
    cap comes first, so a request that is too big is told so, not to wait."""
    max_tokens = body.max_tokens or body.max_completion_tokens
    llm.check_caps(loaded.engine, body.n, max_tokens)  # a cap the request passes is named before the total
    llm.check_request_size(loaded.engine, prompts, body.n, max_tokens or 1, "prompt")
    if prompts > 1:
        charge(request, who, settings, "inference", prompts - 1, counts=prompts)


async def _offload(request: Request, fn: Any, *args: Any) -> Any:
    return await request.app.state.blocking.run(fn, *args)


@router.get("/models")
def list_models(session: SessionDep, who: PrincipalDep) -> dict[str, Any]:
    rows = session.scalars(
        select(Deployment).where(Deployment.project == who.project, Deployment.kind == "llm").order_by(Deployment.name)
    )
    return {"object": "list", "data": [_model_card(r) for r in rows]}


@router.get("/models/{model}")
def get_model(model: str, session: SessionDep, who: PrincipalDep) -> dict[str, Any]:
    return _model_card(_llm(session, who, model))


def _model_card(row: Deployment) -> dict[str, Any]:
    return {
        "id": row.name,
        "object": "model",
        "created": int(row.created_at.timestamp()),
        "owned_by": row.project,
        "root": row.model,
    }


@router.post(
    "/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "the completion; with `stream: true`, server-sent events ending in `data: [DONE]`",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        **errors(404, 503),
    },
)
async def chat_completions(
    body: ChatRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    who: InferenceLimitDep,
) -> Any:
    row = _llm(session, who, body.model)
    session.commit()  # nothing of this request's transaction may stay open (SQLite: locked) while it generates
    loaded = await _prepare(request, row, settings, store)
    assert loaded.llm is not None
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]

    def prepare() -> llm.Plan:
        assert loaded.llm is not None
        text = llm.chat_prompt(loaded.llm.tokenizer, messages, settings.template_timeout_s)
        plan = _plan(loaded, body, [text], "messages")
        plan.chat_template = "model" if llm.has_chat_template(loaded.llm.tokenizer) else "plain-fallback"
        return plan

    p = await _offload(request, prepare)
    # a model without a chat template was prompted with plain `role: content` turns: say so, streamed or not
    response.headers["X-Chat-Template"] = p.chat_template or "model"
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": row.name}

    asked = Logprobs.of(p, loaded)
    if body.stream:

        def chunks(index: int | None, delta: str | None) -> list[dict[str, Any]]:
            if index is None:  # the opening chunk of each choice names the role
                return [
                    {
                        **head,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                    for i in range(p.n)
                ]
            choice = {"index": index, "delta": {"content": delta}, "finish_reason": None}
            if asked is not None:
                choice["logprobs"] = asked.chat(asked.delta(index))
            return [{**head, "choices": [choice]}]

        streamed = _stream_response(request, loaded, p, body, head, chunks, {"delta": {}})
        streamed.headers["X-Chat-Template"] = response.headers["X-Chat-Template"]
        return streamed

    with admission(loaded, settings):
        done = await _generate(request, loaded, p)
    _log_served(request, p, done)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": row.name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": asked.chat(asked.choice(i, c)) if asked is not None else None,
            }
            for i, c in enumerate(done)
        ],
        "usage": llm.usage(p, done),
    }


@router.post(
    "/completions",
    response_model=None,
    responses={
        200: {
            "description": "the completion; with `stream: true`, server-sent events ending in `data: [DONE]`",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        **errors(404, 503),
    },
)
async def completions(
    body: CompletionRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    who: InferenceLimitDep,
) -> Any:
    row = _llm(session, who, body.model)
    session.commit()  # nothing of this request's transaction may stay open (SQLite: locked) while it generates
    loaded = await _prepare(request, row, settings, store)
    texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not texts:
        raise field_problem("/prompt", "give at least one prompt")
    _charge_prompts(request, who, settings, loaded, body, len(texts))
    p = await _offload(request, _plan, loaded, body, texts, "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": row.name}

    def prefix(index: int) -> str:
        return texts[index // p.n] if body.echo else ""

    asked = Logprobs.of(p, loaded)

    if body.stream:

        def chunks(index: int | None, delta: str | None) -> list[dict[str, Any]]:
            if index is None:
                return [
                    {**head, "choices": [{"index": i, "text": prefix(i), "logprobs": None, "finish_reason": None}]}
                    for i in range(len(texts) * p.n)
                    if prefix(i)
                ]
            logprobs = asked.completion(asked.delta(index)) if asked is not None else None
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": None}
            return [{**head, "choices": [choice]}]

        return _stream_response(request, loaded, p, body, head, chunks, {"text": "", "logprobs": None})

    with admission(loaded, settings):
        done = await _generate(request, loaded, p)
    _log_served(request, p, done)
    return {
        **head,
        "choices": [
            {
                "index": i,
                "text": prefix(i) + c.text,
                "logprobs": asked.completion(asked.choice(i, c), len(prefix(i))) if asked is not None else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ],
        "usage": llm.usage(p, done),
    }


class ImageGeneration(ImageRequest):
    """OpenAI's images body (`model`, `prompt`, `n`, `response_format`, `size`) plus our guidance fields."""

    model: str = Field(..., min_length=1, max_length=64, description="a diffusion deployment name")
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = Field(
        None,
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description="WIDTHxHEIGHT; a latent model (with a VAE) draws multiples of its size step, a pixel-space model "
        "its native size only (e.g. 16x16): any other is a 422",
    )


@router.post("/images/generations", responses=errors(404))
def images_generations(
    body: ImageGeneration,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    who: InferenceLimitDep,
) -> dict[str, Any]:
    row = find_deployment(session, who.project, body.model, kind="diffusion", pointer="/model")
    session.commit()  # no transaction stays open while it samples
    fields = body.model_dump(by_alias=True, exclude={"model", "response_format", "size"}, exclude_unset=True)
    if body.size is not None:
        loaded = warm(request, row, settings, store)
        assert loaded.diffusion is not None
        native = native_size(loaded.diffusion)
        width, _, height = body.size.partition("x")
        if loaded.diffusion.vae is None and body.size != f"{native}x{native}":
            raise field_problem(
                "/size",
                f"this model samples in pixel space at {native}x{native} only; ask for {native}x{native} or leave "
                "size out",
            )
        if not (0 < int(width) <= 4096 and 0 < int(height) <= 4096):
            raise field_problem("/size", "width and height are 1 to 4096 pixels")
        fields |= {"width": int(width), "height": int(height)}
    return generate_images(row, ImageRequest.model_validate(fields), request, settings, store)
