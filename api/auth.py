"""Projects, API keys, roles, rate limits and the audit log.

A key is `cru_` + 32 random bytes (URL-safe base64). Only its sha256 is stored: keys carry 256 bits
of entropy, so a fast hash is enough (no password-stretching needed) and lookups stay one indexed
SELECT. A key belongs to one project and has one role; `viewer` may read, `member` may also write
(submit, cancel, upload, deploy), `admin` may also manage keys, projects and read the audit log.

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
from workers.tables import DEFAULT_PROJECT, ROLES, ApiKey, AuditEvent, Project, utcnow

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
    """The embedded default's key: made on the first `up`, kept in home/admin-key (owner-only).

    If the file is there and its key is still valid, reuse it; otherwise (first start, or the key
    was revoked or the database replaced) mint a new admin key of the default project.
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
        _, secret = create_key(s, DEFAULT_PROJECT, "admin", name="admin (created by crucible up)")
        s.add(AuditEvent(project=DEFAULT_PROJECT, action="key.create", target="admin", detail={"by": "crucible up"}))
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


def authenticate(request: Request, session: SessionDep) -> Principal:
    key, from_cookie = presented_key(request)
    if not key:
        raise _unauthorized(
            "this route needs an API key: `Authorization: Bearer <key>` (the admin key of a local "
            "`crucible up` is in $CRUCIBLE_HOME/admin-key)"
        )
    row = lookup_key(session, key)
    if row is None:
        raise _unauthorized("the key is unknown or revoked; ask a project admin for a new one")
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


# -- rate limits and quotas -------------------------------------------------------
class RateLimiter:
    """A token bucket per (key, bucket name): `per_minute` requests, refilled continuously."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, key_id: str, bucket: str, per_minute: int) -> float:
        """0 if allowed, else the seconds until the next request would be."""
        now = time.monotonic()
        rate = per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get((key_id, bucket), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[(key_id, bucket)] = (tokens - 1.0, now)
                return 0.0
            self._buckets[(key_id, bucket)] = (tokens, now)
            return (1.0 - tokens) / rate


def _limited(bucket: str, setting: str):  # type: ignore[no-untyped-def]
    def check(request: Request, principal: PrincipalDep, settings: SettingsDep) -> Principal:
        limiter: RateLimiter = request.app.state.rate_limiter
        per_minute = getattr(settings, setting)
        wait = limiter.take(principal.key_id, bucket, per_minute)
        if wait:
            raise Problem(
                429,
                "rate-limited",
                "Too many requests",
                f"this key may make {per_minute} {bucket} requests per minute "
                f"(CRUCIBLE_{setting.upper()}); retry in {wait:.1f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
                extra={"limit_per_minute": per_minute},
            )
        return principal

    return check


SubmitLimitDep = Annotated[Principal, Depends(_limited("submission", "rate_limit_submit_per_minute"))]
InferenceLimitDep = Annotated[Principal, Depends(_limited("inference", "rate_limit_inference_per_minute"))]


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


def check_storage_quota(session: Session, settings: Settings, project: str, incoming: int) -> None:
    _, limit = project_limits(session, settings, project)
    used = stored_bytes(session, project)
    if used + incoming > limit:
        raise Problem(
            413,
            "storage-quota",
            "Project storage quota exceeded",
            f"project {project} stores {used} bytes; adding {incoming} would pass its limit of {limit} "
            "bytes; delete old jobs or datasets, or ask an admin to raise the quota",
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
