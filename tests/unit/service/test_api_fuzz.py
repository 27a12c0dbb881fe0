"""Schemathesis fuzzes the whole OpenAPI surface, with and without a key: no 5xx, and every error is
an RFC 9457 problem body. The number of cases run is printed (`-s`) for the issue note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from schemathesis.checks import not_a_server_error

from api.app import create_app
from tests.conftest import make_key, make_settings
from workers.db import upgrade

_home = Path(__import__("tempfile").mkdtemp(prefix="crucible-fuzz-"))
# the document declares bearer auth, so cases carry generated keys: failed authentications must not turn into 429s
SETTINGS = make_settings(
    _home, rate_limit_submit_per_minute=10**6, max_active_jobs_per_project=10**6, auth_failures_per_minute=10**6
)
upgrade(SETTINGS.database_url)
APP = create_app(SETTINGS, run_executor=False)
KEY = make_key(SETTINGS, role="admin")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# The catalogue imports every method module on first use (tens of seconds on 2 cores): do it once
# here, so the fuzzed calls measure the API, not imports.
[m.describe() for m in __import__("models.registry", fromlist=["list_methods"]).list_methods()]
CASES = {"with key": 0, "without key": 0}


def assert_problem_body(response) -> None:  # type: ignore[no-untyped-def]
    if response.status_code < 400:
        return
    assert (
        response.headers.get("content-type", [""])[0].startswith("application/problem+json")
        if isinstance(response.headers.get("content-type"), list)
        else response.headers["content-type"].startswith("application/problem+json")
    ), (response.status_code, response.headers)
    body = json.loads(response.content)
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == response.status_code, body


FUZZ = hyp_settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_fuzz_with_a_key_never_500s_and_errors_are_problems(case):
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    assert_problem_body(response)
    CASES["with key"] += 1


@schema.parametrize()
@FUZZ
def test_fuzz_without_a_key_is_always_401_or_public(case):
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    assert_problem_body(response)
    if case.path not in ("/api/v1/health",):
        # 401, or a refusal of the request's shape that FastAPI makes before any dependency runs
        # (malformed JSON, schema errors — the schema is public anyway); never data, never a 404
        # that would reveal whether an id exists
        assert response.status_code in (400, 401, 405, 413, 415, 422), (case.method, case.path, response.status_code)
    CASES["without key"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    yield
    print(f"\nschemathesis cases: {CASES}")
