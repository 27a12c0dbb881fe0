"""The request guard: pure ASGI middleware in front of every route.

- **Request ids.** A client's `X-Request-ID` is kept only if it is short and plain (`REQUEST_ID_RULE`);
  anything else is replaced by one of ours, so the audit log never stores what a client chose to send.
- **Body caps counted as the bytes stream.** `Content-Length` is a hint: a declared length over the
  cap is refused at once, and a body sent chunked (or lying about its length) is counted as it is
  received and refused with a 413 the moment it passes the cap, for every route, before anything
  parses it whole.
- **Disconnects.** Being pure ASGI (not Starlette's `BaseHTTPMiddleware`), it hands the server's own
  `receive` through, so `request.is_disconnected()` sees a client that hung up and generation for it stops.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
from workers.settings import Settings

REQUEST_ID_RULE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
UPLOAD_ROUTES = {("POST", "/api/v1/datasets"), ("POST", "/api/v1/models")}
UPLOAD_PARTS = "/api/v1/uploads/"  # a resumable upload's parts: PATCH /api/v1/uploads/{id}
FORM_SLACK = 1024 * 1024  # multipart framing and the small form fields around an upload's file


def request_id(header: str | None) -> str:
    return header if header and REQUEST_ID_RULE.match(header) else uuid.uuid4().hex


def body_cap(settings: Settings, method: str, path: str) -> tuple[int, str]:
    """(bytes, setting) a request's body may hold."""
    if (method, path.rstrip("/")) in UPLOAD_ROUTES:
        return settings.max_upload_bytes + FORM_SLACK, "CRUCIBLE_MAX_UPLOAD_BYTES"
    if method == "PATCH" and path.startswith(UPLOAD_PARTS):
        return settings.upload_part_bytes, "CRUCIBLE_UPLOAD_PART_BYTES"
    return settings.max_json_bytes, "CRUCIBLE_MAX_JSON_BYTES"


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = request_id(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        cap, setting = body_cap(self.settings, scope["method"], scope["path"])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            response = problems.problem_response(Request(scope), problems.body_too_large(cap, setting, scope["path"]))
            await response(scope, receive, send_with_id)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise problems.BodyTooLarge(cap, setting, scope["path"])
            return message

        await self.app(scope, counted, send_with_id)


def cross_site(headers: Any, own_origin: str) -> bool:
    """Whether a browser says this request came from another site (Fetch Metadata, else Origin).

    Requests without either header (scripts, curl, a link pasted into the address bar by hand) are not
    cross-site: a browser always sends them on the requests that matter here."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = headers.get("origin")
    return origin is not None and origin.rstrip("/") != own_origin.rstrip("/")
