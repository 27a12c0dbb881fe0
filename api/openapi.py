"""The OpenAPI document, made to describe what the server really answers.

FastAPI documents a route's success and a 422 as `application/json`; every error of this API is an RFC 9457
problem body (`application/problem+json`), routes answer 400, 401, 403, 404, 409, 413, 415, 429 and 503
too, and authentication is a bearer key. `build_openapi` starts from FastAPI's document and adds, for each
operation: the bearer security requirement (every route but health), the errors every authenticated route
can give (401, 403, 429 for failed authentications), those of its inputs (400 and 413 with a body, 422 with
any parameter), and those the route declares with `responses=errors(...)`; each error response carries the
`Problem` schema under `application/problem+json`. A test runs schemathesis with every check against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.problems import PROBLEM_JSON

PUBLIC_PATHS = {"/api/v1/health"}  # no key needed (/docs, /redoc and /openapi.json are not in the document)
BEARER = "bearerKey"
MEANINGS = {
    304: "Not modified: the `If-None-Match` ETag still matches",
    400: "Malformed request: the body is not JSON, or a header or path is unusable",
    401: "No API key, or an unknown or revoked one (`Authorization: Bearer <key>`)",
    403: "The key's role may not do this (a viewer writing, a non-operator on operator routes), or a "
    "cross-site browser request",
    404: "No such resource in the key's project (another project's answers the same)",
    409: "The resource's state forbids it (a running job, a name taken)",
    413: "The request body, the upload or the project's storage quota is over its limit",
    415: "The uploaded file is of an unsupported format",
    422: "A field is invalid; `errors[].pointer` names it",
    429: "A rate limit or a quota (active jobs, deployments, requests in flight); `Retry-After` says when to retry",
    500: "An internal error; the server log has the details under the `request_id`",
    503: "The server's queue for blocking work is full; retry shortly",
}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "An RFC 9457 problem body; on `/v1/*` it also carries OpenAI's `error` object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "`/problems/<slug>`"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what is wrong and how to fix it, naming the field"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pointer", "message"],
                "properties": {
                    "pointer": {"type": "string", "description": "JSON pointer of the field, e.g. /params/lr"},
                    "message": {"type": "string"},
                },
            },
        },
        "error": {
            "type": "object",
            "description": "OpenAI's error object (on `/v1/*` only): what the OpenAI SDKs read",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
    },
    "additionalProperties": True,
}


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": MEANINGS[304]}}


# (path, query parameter) → the values it takes, known only once the server runs (e.g. the registry's families)
DYNAMIC_ENUMS: dict[tuple[str, str], Callable[[], list[str]]] = {}


def dynamic_enum(path: str, parameter: str, values: Callable[[], list[str]]) -> None:
    """Document a query parameter's values, read when the document is first built."""
    DYNAMIC_ENUMS[(path, parameter)] = values


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error statuses it can answer besides the ones every route has."""
    return {code: {"description": MEANINGS[code]} for code in codes}


def _problem_response(code: int) -> dict[str, Any]:
    return {
        "description": MEANINGS.get(code, "An error"),
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
    )
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "an API key, `cru_…` ($CRUCIBLE_HOME/admin-key)"}
    }
    for path, operations in doc["paths"].items():
        for verb, op in operations.items():
            for param in op.get("parameters", []):
                if (path, param["name"]) in DYNAMIC_ENUMS:
                    schema = param["schema"]
                    target = next((s for s in schema.get("anyOf", []) if s.get("type") == "string"), schema)
                    target["enum"] = DYNAMIC_ENUMS[(path, param["name"])]()
            responses = op.setdefault("responses", {})
            codes = {int(c) for c in responses if c.isdigit() and int(c) >= 400}
            if path not in PUBLIC_PATHS:
                op["security"] = [{BEARER: []}]
                codes |= {401, 403, 429}
                if verb not in ("get", "head", "options"):
                    codes.add(409)  # every write of an archived project (api.auth)
            if op.get("parameters") or op.get("requestBody"):
                codes.add(422)
            if op.get("requestBody"):
                codes |= {400, 413}
            if "{" in path:
                codes.add(404)
            codes.add(500)
            for code in codes:
                responses[str(code)] = _problem_response(code)
            op["responses"] = dict(sorted(responses.items()))
    app.openapi_schema = doc
    return doc
