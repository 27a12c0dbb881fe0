"""RFC 9457 problem details: every error leaves the API as `application/problem+json`.

Business code raises specific exceptions; this module maps them to problem bodies at the edge,
with a JSON pointer for each field at fault and a sentence saying how to fix it.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Collection, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.context import ArtifactNameError
from models.datasets import DatasetSchemaError, UnknownDatasetError
from models.registry import UnknownMethodError
from serving.errors import EngineOptionsInvalid, ServingError
from workers.lifecycle import JobNotFound, JobStateConflict
from workers.redact import scrub_paths, server_roots

log = logging.getLogger("crucible.api")
PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str = "",
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.errors = errors or []
        self.headers = headers or {}
        self.extra = extra or {}


class BodyTooLarge(StarletteHTTPException):
    """A request body passed its cap while it streamed in (raised from the guarded `receive`)."""

    def __init__(self, limit: int, setting: str, path: str):
        super().__init__(413, f"the body of {path} is over {limit} bytes ({setting}); send less")
        self.limit, self.setting, self.path = limit, setting, path


def field_problem(
    pointer: str,
    message: str,
    *,
    status: int = 422,
    slug: str = "invalid-field",
    title: str = "A field of the request is invalid",
) -> Problem:
    return Problem(
        status,
        slug,
        title,
        f"{pointer.lstrip('/') or 'body'}: {message}",
        errors=[{"pointer": pointer, "message": message}],
    )


def _server_roots(request: Request) -> list[str]:
    """Folders of this server whose paths an error body must never show (state, temp, the Python install)."""
    settings = getattr(request.app.state, "settings", None) if "app" in request.scope else None
    return server_roots(settings.home if settings is not None else None)


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
# our problem types under the codes OpenAI's API uses for the same errors (clients such as LangChain test them)
OPENAI_CODES = {
    "deployment-not-found": "model_not_found",
    "context-exceeded": "context_length_exceeded",
    "prompt-too-long": "context_length_exceeded",
    "unauthorized": "invalid_api_key",
}


def openai_param(pointer: str) -> str | None:
    """`/messages/0/content` → `messages[0].content`: the field as OpenAI's `error.param` names it."""
    parts = [p for p in pointer.split("/") if p]
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def openai_error(problem: Problem, detail: str, errors: list[dict[str, str]]) -> dict[str, Any]:
    """OpenAI's error object (`error.message`, `.type`, `.param`, `.code`): what its SDKs put in the exception."""
    kind = OPENAI_TYPES.get(problem.status, "server_error" if problem.status >= 500 else "invalid_request_error")
    return {
        "message": detail,
        "type": kind,
        "param": openai_param(errors[0]["pointer"]) if errors and errors[0].get("pointer") else None,
        "code": OPENAI_CODES.get(problem.slug, problem.slug.replace("-", "_")),
    }


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    roots = _server_roots(request)
    detail = scrub_paths(problem.detail or problem.title, roots)
    errors = [{**e, "message": scrub_paths(str(e.get("message", "")), roots)} for e in problem.errors]
    body: dict[str, Any] = {
        "type": f"/problems/{problem.slug}",
        "title": problem.title,
        "status": problem.status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None) or uuid.uuid4().hex,
        **problem.extra,
    }
    if errors:
        body["errors"] = errors
    if is_openai_path(request.url.path):  # what OpenAI's SDKs read: error.message, .type, .param, .code
        body["error"] = openai_error(problem, detail, errors)
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers)


def body_too_large(limit: int, setting: str, path: str) -> Problem:
    return Problem(
        413,
        "body-too-large",
        "Request body too large",
        f"the body is over {limit} bytes, the limit for {path} ({setting}); send a smaller body",
        extra={"limit_bytes": limit},
    )


def _pointer(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return "/" + "/".join(parts)


# a pattern's meaning in words, for the 422 of a string that does not match it (a regex says little to a user)
PATTERN_HINTS: dict[str, str] = {}


def pattern_hint(pattern: str, words: str) -> str:
    """Register what `pattern` asks for (e.g. "2-64 lowercase letters, …"); returns the pattern."""
    PATTERN_HINTS[pattern] = words
    return pattern


def _validation_message(err: dict[str, Any]) -> str:
    msg = err.get("msg", "invalid")
    ctx = err.get("ctx") or {}
    if err.get("type") == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
        return PATTERN_HINTS[ctx["pattern"]]
    if err.get("type") == "extra_forbidden":
        return "unknown field; remove it (see the schema at /api/v1/methods)"
    if err.get("type") in BOUND_ERRORS and not _finite(err.get("input")):
        return f"must be a finite number, not {err.get('input')!r} ({msg[0].lower() + msg[1:]})"
    if err.get("type") == "missing":
        return "required field is missing"
    if ctx and not any(str(v) in msg for v in ctx.values()):
        msg += f" ({', '.join(f'{k}={v}' for k, v in ctx.items())})"
    return msg


BOUND_ERRORS = {"less_than", "less_than_equal", "greater_than", "greater_than_equal", "finite_number"}


def _finite(value: Any) -> bool:
    """Whether a value that failed a numeric bound is a real number (NaN and ±infinity fail every bound in a way
    "must be ≤ 0.9" does not explain)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def dataset_problem(exc: DatasetSchemaError, sent: Collection[str] = ()) -> Problem:
    """A dataset that does not fit its kind, naming the array the client sent: an upload of `x` and `y` is split
    60/20/20 before it is checked, and the kit's checks name the split arrays (`y_train`), which the client
    never sent."""
    field = exc.field
    message = str(exc).removeprefix(f"{field}: ")  # the pointer names the field; the message need not repeat it
    if "x" in sent and "y" in sent and "x_train" not in sent:
        split = re.fullmatch(r"([xy])_(train|val|test)", field)
        message = re.sub(r"\b([xy])_(train|val|test)\b", r"\1", message)
        if split:
            field = split.group(1)
            message += f" (found in the {split.group(2)} part of {field} after the 60/20/20 split)"
    return field_problem(f"/{field}", message, slug="dataset-invalid", title="The dataset does not fit its kind")


def serving_problem(exc: ServingError) -> Problem:
    """The serving engine's refusal as a problem body: its status, slug, pointers and headers carry over."""
    if isinstance(exc, EngineOptionsInvalid):
        return validation_problem(exc.validation_errors, prefix=exc.prefix)
    return Problem(exc.status, exc.slug, exc.title, exc.detail, errors=exc.errors, headers=exc.headers, extra=exc.extra)


def validation_problem(errors: list[dict[str, Any]], prefix: str = "") -> Problem:
    items = [{"pointer": prefix + _pointer(tuple(e.get("loc", ()))), "message": _validation_message(e)} for e in errors]
    detail = "; ".join(f"{i['pointer']}: {i['message']}" for i in items)
    return Problem(422, "validation-error", "The request does not match its schema", detail, errors=items)


def _leaf_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(prefix, route) of every endpoint, through the routers `include_router` added."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _leaf_routes(inner.routes, prefix + (getattr(context, "prefix", "") or ""))
        else:
            yield prefix, route


def allowed_methods(request: Request) -> list[str]:
    """The methods of the resource at this path: those of every route with the path template of the first
    route matching it (`/api/v1/jobs/{job_id}`: GET and DELETE). Starlette's 405 names only the first route's
    (GET). The template is the resource: `/projects/current` is not `/projects/{name}`, though both match."""
    from starlette.routing import Match

    path, template, methods = request.scope["path"], None, set()
    for prefix, route in _leaf_routes(request.app.router.routes):
        if not getattr(route, "methods", None) or not path.startswith(prefix):
            continue
        if template is None:
            scope = {**request.scope, "path": path[len(prefix) :], "method": next(iter(route.methods))}
            if route.matches(scope)[0] == Match.FULL:
                template = (prefix, route.path)
        if template == (prefix, route.path):
            methods |= set(route.methods)
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return problem_response(request, serving_problem(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            e = next(e for e in errors if e.get("type") == "json_invalid")
            pos = (e.get("ctx") or {}).get("error", "")
            return problem_response(
                request,
                Problem(
                    400,
                    "malformed-json",
                    "The body is not valid JSON",
                    f"could not parse the JSON body: {pos}; send a JSON object",
                ),
            )
        return problem_response(request, validation_problem(errors))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return problem_response(request, body_too_large(exc.limit, exc.setting, exc.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized", 403: "forbidden"}.get(
            exc.status_code, "http-error"
        )
        detail = str(exc.detail) if exc.detail else ""
        headers = dict(exc.headers or {})
        if exc.status_code == 404 and detail in ("", "Not Found"):
            detail = f"nothing at {request.url.path}; see /docs for the routes"
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not served at {request.url.path}; it takes {', '.join(allowed)}"
        return problem_response(request, Problem(exc.status_code, slug, detail or slug, detail, headers=headers))

    @app.exception_handler(JobNotFound)
    async def _job_404(request: Request, exc: JobNotFound) -> JSONResponse:
        return problem_response(
            request,
            Problem(404, "job-not-found", "No such job", f"no job with id {exc.job_id}; list jobs at /api/v1/jobs"),
        )

    @app.exception_handler(JobStateConflict)
    async def _job_409(request: Request, exc: JobStateConflict) -> JSONResponse:
        return problem_response(
            request,
            Problem(
                409,
                "job-state-conflict",
                "The job's state forbids this",
                f"{exc}; only queued, starting or running jobs can be {exc.action}",
                extra={"job_status": exc.status},
            ),
        )

    @app.exception_handler(UnknownMethodError)
    async def _method_404(request: Request, exc: UnknownMethodError) -> JSONResponse:
        return problem_response(
            request,
            Problem(404, "method-not-found", "No such method", f"{exc.args[0]}; list methods at /api/v1/methods"),
        )

    @app.exception_handler(UnknownDatasetError)
    async def _dataset_404(request: Request, exc: UnknownDatasetError) -> JSONResponse:
        return problem_response(
            request,
            Problem(
                404,
                "dataset-not-found",
                "No such dataset",
                f"no dataset named {exc.name!r}; list datasets at /api/v1/datasets",
            ),
        )

    @app.exception_handler(DatasetSchemaError)
    async def _dataset_schema(request: Request, exc: DatasetSchemaError) -> JSONResponse:
        return problem_response(request, dataset_problem(exc))

    @app.exception_handler(ArtifactNameError)
    async def _artifact_name(request: Request, exc: ArtifactNameError) -> JSONResponse:
        return problem_response(request, Problem(400, "bad-path", "Bad artifact path", str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(
            request,
            Problem(
                500,
                "internal-error",
                "Internal error",
                f"{type(exc).__name__}; the server log has the details "
                f"(request id {getattr(request.state, 'request_id', '?')})",
            ),
        )
