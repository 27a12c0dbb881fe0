"""Projects, API keys, roles, rate limits and the audit log.

A key is `cru_` + 32 random bytes (URL-safe base64). Only its sha256 is stored: keys carry 256 bits
of entropy, so a fast hash is enough (no password-stretching needed) and lookups stay one indexed
SELECT. A key belongs to one project and has one role; `viewer` may read, `member` may also write
(submit, cancel, upload, deploy), `admin` may also manage the project's keys and read its audit log, and
`operator` (the key `crucible up` makes for the `default` project) also runs the server: it alone creates
projects, sets their quotas and reads the server-wide metrics.

Isolation rule: a key never learns that another project's thing exists — lookups filter by project
first, so a foreign id answers 404 exactly like a missing one.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep
from api.problems import Problem, field_problem
from workers.db import session_scope
from workers.settings import Settings
from workers.tables import DEFAULT_PROJECT, OPERATOR, ROLES, ApiKey, AuditEvent, Project, utcnow

KEY_PREFIX = "cru_"
SESSION_COOKIE = "crucible_key"
# Cookie-authenticated writes must carry this header: a cross-site form cannot set it, so a page on
# another origin cannot ride the dashboard's cookie (CSRF), while the dashboard's fetch() sets it.
DASHBOARD_HEADER = "X-Crucible-Client"
PROJECT_NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}$")
READ_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its project and its role."""

    key_id: str
    project: str
    role: str
    key_name: str = ""

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- projects and keys (plain functions of a session) ----------------------------
def create_project(session: Session, name: str, description: str = "") -> Project:
    if not PROJECT_NAME_RULE.match(name):
        raise field_problem("/name", "use 2-64 lowercase letters, digits, '_' or '-', starting with a letter or digit")
    if session.get(Project, name) is not None:
        raise field_problem(
            "/name",
            f"a project named {name!r} exists; choose another name",
            status=409,
            slug="project-exists",
            title="Project exists",
        )
    project = Project(name=name, description=description)
    session.add(project)
    session.flush()
    return project


def create_key(
    session: Session, project: str, role: str, name: str = "", created_by: str | None = None
) -> tuple[ApiKey, str]:
    """A new key; the secret is returned here once and never again."""
    if role not in ROLES:
        raise field_problem("/role", f"use one of {', '.join(ROLES)}")
    if session.get(Project, project) is None:
        raise Problem(404, "project-not-found", "No such project", f"no project named {project!r}")
    secret = new_key()
    row = ApiKey(
        project=project, role=role, name=name, prefix=secret[:10], hash=hash_key(secret), created_by=created_by
    )
    session.add(row)
    session.flush()
    return row, secret


def revoke_key(session: Session, project: str, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None or row.project != project:
        raise Problem(404, "key-not-found", "No such key", f"no key {key_id} in project {project}; see /api/v1/keys")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def bootstrap_admin_key(settings: Settings) -> str:
    """The server operator's key: made on the first `up`, kept in home/admin-key (owner-only).

    If the file is there and its key is still valid, reuse it; otherwise (first start, or the key
    was revoked or the database replaced) mint a new operator key of the default project: whoever
    can read the server's state folder runs the server.
    """
    path = settings.admin_key_file
    existing = path.read_text().strip() if path.is_file() else ""
    with session_scope(settings.database_url) as s:
        if existing:
            row = s.scalars(select(ApiKey).where(ApiKey.hash == hash_key(existing))).first()
            if row is not None and row.revoked_at is None:
                return existing
        if s.get(Project, DEFAULT_PROJECT) is None:
            s.add(Project(name=DEFAULT_PROJECT))
            s.flush()
        _, secret = create_key(s, DEFAULT_PROJECT, OPERATOR, name="operator (created by crucible up)")
        s.add(AuditEvent(project=DEFAULT_PROJECT, action="key.create", target=OPERATOR, detail={"by": "crucible up"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    return secret


# -- the request dependency -------------------------------------------------------
def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, "unauthorized", "Authentication required", detail, headers={"WWW-Authenticate": 'Bearer realm="crucible"'}
    )


def presented_key(request: Request) -> tuple[str, bool]:
    """The key of this request and whether it came from the dashboard's cookie."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("send the key as `Authorization: Bearer <key>`")
        return token.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return cookie, bool(cookie)


def lookup_key(session: Session, key: str) -> ApiKey | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.hash == hash_key(key))).first()
    return row if row is not None and row.revoked_at is None else None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def auth_failed(request: Request, settings: Settings) -> Problem:
    """The answer to a failed authentication: 401, or 429 once the client's address failed more than
    CRUCIBLE_AUTH_FAILURES_PER_MINUTE times this minute. Valid keys from that address still pass (an
    address may be shared, and a neighbour's failures must not lock a user out); keys are 256-bit
    random, so the limit bounds the work wrong keys cost, not a guessing attack."""
    limiter: RateLimiter = request.app.state.rate_limiter
    per_minute = settings.auth_failures_per_minute
    wait = limiter.take([(f"addr:{client_address(request)}", "auth-failure", per_minute)])
    if wait:
        return _rate_problem(
            f"{per_minute} failed authentications per minute from one address (CRUCIBLE_AUTH_FAILURES_PER_MINUTE)",
            per_minute,
            wait,
        )
    return _unauthorized("the key is unknown or revoked; ask a project admin for a new one")


def authenticate(request: Request, session: SessionDep, settings: SettingsDep) -> Principal:
    key, from_cookie = presented_key(request)
    if not key:
        raise _unauthorized(
            "this route needs an API key: `Authorization: Bearer <key>` (the operator key of a local "
            "`crucible up` is in $CRUCIBLE_HOME/admin-key)"
        )
    row = lookup_key(session, key)
    if row is None:
        raise auth_failed(request, settings)
    if from_cookie and request.method not in READ_METHODS and request.headers.get(DASHBOARD_HEADER) != "dashboard":
        raise Problem(
            403,
            "csrf",
            "Cross-site request refused",
            f"a write authenticated by the dashboard cookie must send the {DASHBOARD_HEADER} header; "
            "scripts should use `Authorization: Bearer <key>`",
        )
    principal = Principal(key_id=row.id, project=row.project, role=row.role, key_name=row.name)
    if request.method not in READ_METHODS and not principal.can("member"):
        raise Problem(
            403,
            "forbidden",
            "This key may only read",
            f"the key {row.prefix}… is a viewer of project {row.project}; writes need a member or admin key",
        )
    if request.method not in READ_METHODS:
        project = session.get(Project, row.project)
        if project is not None and project.archived_at is not None:
            raise Problem(
                409,
                "project-archived",
                "The project is archived",
                f"project {row.project} has been archived (read-only) since {project.archived_at:%Y-%m-%d %H:%M} "
                f"UTC; its jobs, models and artifacts can still be read. The server's operator can restore it: "
                f"POST /api/v1/projects/{row.project}/restore",
            )
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now  # coarse, so polling does not turn every read into a write
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.can("admin"):
        raise Problem(
            403,
            "forbidden",
            "Admin role required",
            f"this needs an admin key of project {principal.project}; yours is a {principal.role}",
        )
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def require_operator(principal: PrincipalDep) -> Principal:
    if not principal.can(OPERATOR):
        raise Problem(
            403,
            "forbidden",
            "Operator role required",
            "creating projects and setting quotas belong to the server's operator (the key `crucible up` "
            f"wrote to $CRUCIBLE_HOME/admin-key); yours is a {principal.role} of project {principal.project}",
        )
    return principal


OperatorDep = Annotated[Principal, Depends(require_operator)]


# -- rate limits and quotas -------------------------------------------------------
Bucket = tuple[str, str, int]  # (who: a key id, `project:<name>` or `addr:<ip>`; bucket name; per minute)


class RateLimiter:
    """Token buckets per (who, bucket name): `per_minute` tokens, refilled continuously.

    A request takes from several buckets at once (its key's and its project's), all or none, so a fresh
    key minted by an admin adds nothing to what its project may do."""

    MAX_BUCKETS = 100_000  # forget idle buckets beyond this (a full bucket and a forgotten one are alike)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def _level(self, who: str, bucket: str, per_minute: int, now: float) -> float:
        tokens, last = self._buckets.get((who, bucket), (float(per_minute), now))
        return min(float(per_minute), tokens + (now - last) * per_minute / 60.0)

    def _wait(self, buckets: list[Bucket], cost: float, now: float) -> float:
        waits = [
            (cost - level) / (per_minute / 60.0)
            for who, name, per_minute in buckets
            if (level := self._level(who, name, per_minute, now)) < cost
        ]
        return max(waits, default=0.0)

    def wait(self, buckets: list[Bucket], cost: float = 1.0) -> float:
        """Seconds until `cost` tokens could be taken from every bucket (0: now); takes nothing."""
        with self._lock:
            return self._wait(buckets, cost, time.monotonic())

    def take(self, buckets: list[Bucket], cost: float = 1.0) -> float:
        """0 after taking `cost` tokens from every bucket, else the seconds to wait (nothing taken)."""
        now = time.monotonic()
        with self._lock:
            wait = self._wait(buckets, cost, now)
            if wait:
                return wait
            if len(self._buckets) > self.MAX_BUCKETS:
                self._buckets.clear()
            for who, name, per_minute in buckets:
                self._buckets[(who, name)] = (self._level(who, name, per_minute, now) - cost, now)
            return 0.0


def _rate_problem(what: str, per_minute: int, wait: float) -> Problem:
    return Problem(
        429,
        "rate-limited",
        "Too many requests",
        f"at most {what}; retry in {wait:.1f} s",
        headers={"Retry-After": str(max(1, round(wait)))},
        extra={"limit_per_minute": per_minute},
    )


LIMITS = {  # bucket → (per-key setting, per-project setting)
    "submission": ("rate_limit_submit_per_minute", "rate_limit_submit_per_minute_per_project"),
    "inference": ("rate_limit_inference_per_minute", "rate_limit_inference_per_minute_per_project"),
}


def charge(
    request: Request, principal: Principal, settings: Settings, bucket: str, cost: int = 1, counts: int | None = None
) -> None:
    """Take `cost` requests from the key's and the project's buckets, or raise the 429 naming the limit
    (`counts`: what the whole request counts, when part of it was taken already)."""
    key_setting, project_setting = LIMITS[bucket]
    per_key, per_project = getattr(settings, key_setting), getattr(settings, project_setting)
    limiter: RateLimiter = request.app.state.rate_limiter
    buckets = [(principal.key_id, bucket, per_key), (f"project:{principal.project}", bucket, per_project)]
    wait = limiter.take(buckets, cost)
    if not wait:
        return
    if cost > min(per_key, per_project):
        wait = 60.0
    key_short = limiter.wait(buckets[:1], cost) > 0
    what = (
        f"{per_key} {bucket} requests per minute per key (CRUCIBLE_{key_setting.upper()})"
        if key_short
        else f"{per_project} {bucket} requests per minute per project, all its keys together "
        f"(CRUCIBLE_{project_setting.upper()})"
    )
    if (counts or cost) > 1:
        what += f"; this request counts {counts or cost}"
    raise _rate_problem(what, per_key if key_short else per_project, wait)


def _limited(bucket: str):  # type: ignore[no-untyped-def]
    def check(request: Request, principal: PrincipalDep, settings: SettingsDep) -> Principal:
        charge(request, principal, settings, bucket)
        return principal

    return check


SubmitLimitDep = Annotated[Principal, Depends(_limited("submission"))]
InferenceLimitDep = Annotated[Principal, Depends(_limited("inference"))]


def project_limits(session: Session, settings: Settings, project: str) -> tuple[int, int]:
    """(max active jobs, max stored bytes) of a project: its own override, else the service default."""
    row = session.get(Project, project)
    jobs = row.max_active_jobs if row is not None and row.max_active_jobs else settings.max_active_jobs_per_project
    stored = row.max_stored_bytes if row is not None and row.max_stored_bytes else settings.max_stored_bytes_per_project
    return jobs, stored


def stored_bytes(session: Session, project: str) -> int:
    from workers.tables import Artifact, DatasetRow, Job, RegisteredModel

    artifacts = (
        session.scalar(
            select(func.coalesce(func.sum(Artifact.size), 0))
            .join(Job, Job.id == Artifact.job_id)
            .where(Job.project == project)
        )
        or 0
    )
    datasets = (
        session.scalar(select(func.coalesce(func.sum(DatasetRow.size), 0)).where(DatasetRow.project == project)) or 0
    )
    models = 0
    for files in session.scalars(select(RegisteredModel.files).where(RegisteredModel.project == project)):
        models += sum(int(f.get("size", 0)) for f in (files or {}).values())
    return int(artifacts) + int(datasets) + models


def check_storage_quota(
    session: Session, settings: Settings, project: str, incoming: int, pointer: str | None = None
) -> None:
    """A 413 when `incoming` more bytes would pass the project's storage quota (naming `pointer`, when given)."""
    _, limit = project_limits(session, settings, project)
    used = stored_bytes(session, project)
    if used + incoming > limit:
        raise Problem(
            413,
            "storage-quota",
            "Project storage quota exceeded",
            f"project {project} stores {used} bytes; adding {incoming} would pass its limit of {limit} "
            "bytes; delete old jobs or datasets, or ask the operator to raise the quota",
            errors=[{"pointer": pointer, "message": "over the project's storage quota"}] if pointer else None,
            extra={"limit_bytes": limit, "used_bytes": used},
        )


# -- the audit log ------------------------------------------------------------------
def audit(
    session: Session, request: Request | None, principal: Principal | None, action: str, target: str = "", **detail: Any
) -> None:
    """One row per state-changing act, written in the same transaction as the act itself."""
    session.add(
        AuditEvent(
            project=principal.project if principal else DEFAULT_PROJECT,
            key_id=principal.key_id if principal else None,
            action=action,
            target=target[:256],
            detail=detail,
            request_id=getattr(request.state, "request_id", None) if request else None,
            client=(request.client.host if request and request.client else None),
        )
    )
