"""What the serving engine refuses, as exception types of its own.

The engine knows nothing of HTTP: it raises these, and the API's problem handlers turn each into an RFC 9457
body (and OpenAI's `error` object on `/v1`) with the status, slug and JSON pointers carried here. Every
message says what to change, because it reaches the person who sent the request.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """A request or an engine option the engine refuses: `status`, a `slug` naming the kind of problem, a `title`,
    the `detail` sentence, `errors` (JSON pointers into the request, each with a message) and response `headers`."""

    status = 422
    slug = "invalid-field"
    title = "A field of the request is invalid"

    def __init__(
        self,
        detail: str,
        errors: list[dict[str, str]] | None = None,
        *,
        status: int | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.status = status if status is not None else type(self).status
        self.slug = slug or type(self).slug
        self.title = title or type(self).title
        self.headers = headers or {}
        self.extra = extra or {}


class InvalidField(ServingError):
    """One field of the request or of the engine options cannot be served (422 naming it)."""

    def __init__(self, pointer: str, message: str, *, slug: str | None = None, title: str | None = None) -> None:
        super().__init__(
            f"{pointer.lstrip('/') or 'body'}: {message}",
            [{"pointer": pointer, "message": message}],
            slug=slug,
            title=title,
        )


class EngineOptionsInvalid(ServingError):
    """Engine options that fail their schema: pydantic's errors (kept whole, so the API words them as it words any
    validation error), each pointed at `/engine/<field>`."""

    slug, title = "validation-error", "The request does not match its schema"

    def __init__(self, validation_errors: list[dict[str, Any]], prefix: str = "/engine") -> None:
        errors = [
            {"pointer": prefix + "".join(f"/{part}" for part in e.get("loc", ())), "message": str(e.get("msg", ""))}
            for e in validation_errors
        ]
        super().__init__("; ".join(f"{e['pointer']}: {e['message']}" for e in errors), errors)
        self.validation_errors, self.prefix = validation_errors, prefix


class PromptTooLong(ServingError):
    """A prompt that does not fit the model's context (400: no option of the request can make it fit)."""

    status, slug, title = 400, "prompt-too-long", "The prompt does not fit the model's context"


class ContextExceeded(ServingError):
    """Prompt plus `max_tokens` past the model's context."""

    status, slug, title = 400, "context-exceeded", "Prompt plus max_tokens exceed the context"


class NotServable(ServingError):
    """A folder that is neither a language model nor a diffusion model."""

    slug, title = "not-servable", "The model cannot be served"


class QueueFull(ServingError):
    """The deployment's scheduler has `max_queue` sequences waiting already: 429 with `Retry-After`, as vLLM's
    and TGI's routers answer an overloaded replica, so clients back off instead of piling on."""

    status, slug, title = 429, "queue-full", "The deployment's queue is full"

    def __init__(self, waiting: int, cap: int, asked: int) -> None:
        super().__init__(
            f"this deployment has {waiting} sequence(s) waiting to join its decode batch and takes at most {cap} "
            f"(engine option max_queue); this request adds {asked}; retry shortly",
            headers={"Retry-After": "1"},
            extra={"queued": waiting, "limit": cap},
        )
