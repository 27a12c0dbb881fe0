"""RFC 9457 problem details: every error leaves the API as `application/problem+json`.

Business code raises specific exceptions; this module maps them to problem bodies at the edge,
with a JSON pointer for each field at fault and a sentence saying how to fix it.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.context import ArtifactNameError
from models.datasets import DatasetSchemaError, UnknownDatasetError
from models.registry import UnknownMethodError
from workers.lifecycle import JobNotFound, JobStateConflict

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
    roots = [tempfile.gettempdir(), sys.prefix, str(Path(__file__).resolve().parents[1])]
    settings = getattr(request.app.state, "settings", None) if "app" in request.scope else None
    if settings is not None:
        roots.insert(0, str(settings.home))
    return sorted({r.rstrip("/") for r in roots if r and r != "/"}, key=len, reverse=True)


def scrub_paths(text: str, roots: list[str]) -> str:
    """`/srv/home/cache/models/a/m/1/config.json` → `…/config.json`: a file's name says what is wrong
    without telling a client where the server keeps its state."""
    if not roots or not text:
        return text
    pattern = re.compile("(?:" + "|".join(re.escape(r) for r in roots) + r")(?:/[^\s'\"]*)?(?=$|[\s'\",;)])")
    return pattern.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


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
    if request.url.path.startswith("/v1/"):  # what OpenAI's SDKs read: error.message, .type, .param, .code
        body["error"] = {
            "message": detail,
            "type": OPENAI_TYPES.get(
                problem.status, "server_error" if problem.status >= 500 else "invalid_request_error"
            ),
            "param": errors[0]["pointer"].lstrip("/") if errors else None,
            "code": problem.slug,
        }
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


def _validation_message(err: dict[str, Any]) -> str:
    msg = err.get("msg", "invalid")
    ctx = err.get("ctx") or {}
    if err.get("type") == "extra_forbidden":
        return "unknown field; remove it (see the schema at /api/v1/methods)"
    if err.get("type") == "missing":
        return "required field is missing"
    if ctx and not any(str(v) in msg for v in ctx.values()):
        msg += f" ({', '.join(f'{k}={v}' for k, v in ctx.items())})"
    return msg


def validation_problem(errors: list[dict[str, Any]], prefix: str = "") -> Problem:
    items = [{"pointer": prefix + _pointer(tuple(e.get("loc", ()))), "message": _validation_message(e)} for e in errors]
    detail = "; ".join(f"{i['pointer']}: {i['message']}" for i in items)
    return Problem(422, "validation-error", "The request does not match its schema", detail, errors=items)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

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
        if exc.status_code == 404 and detail in ("", "Not Found"):
            detail = f"nothing at {request.url.path}; see /docs for the routes"
        return problem_response(
            request, Problem(exc.status_code, slug, detail or slug, detail, headers=dict(exc.headers or {}))
        )

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
        return problem_response(
            request,
            field_problem(
                f"/{exc.field}", f"{exc.args[0]}", slug="dataset-invalid", title="The dataset does not fit its kind"
            ),
        )

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
