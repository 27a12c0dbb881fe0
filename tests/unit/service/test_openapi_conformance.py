"""The OpenAPI document describes the API: schemathesis with every check (`--checks all`: status codes,
content types, headers, response schemas, positive and negative data, Allow headers on 405, missing headers,
ignored auth, use after free, resource availability) over the whole document, against the server on loopback.

Bounded: a fixed seed and a fixed number of cases per operation, so it runs in about a minute. The one
relaxation is in schemathesis.toml beside this file, with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from api.app import create_app
from api.auth import bootstrap_admin_key
from tests.conftest import make_settings
from tests.unit.service.attacks import live_server
from workers.db import upgrade

HERE = Path(__file__).parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MIN_CASES = 2000


def test_schemathesis_with_every_check_finds_nothing(tmp_path):
    unlimited = 10**6  # the run sends thousands of requests a minute: rate limits would only add 429s
    settings = make_settings(
        tmp_path / "home",
        rate_limit_submit_per_minute=unlimited,
        rate_limit_submit_per_minute_per_project=unlimited,
        rate_limit_inference_per_minute=unlimited,
        rate_limit_inference_per_minute_per_project=unlimited,
        auth_failures_per_minute=unlimited,
        max_active_jobs_per_project=unlimited,
    )
    upgrade(settings.database_url)
    key = bootstrap_admin_key(settings)  # the operator: every operation of the document is the caller's to try
    report = tmp_path / "report.json"
    with live_server(create_app(settings, run_executor=False)) as port:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "--no-color",
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
                "--header",
                f"Authorization: Bearer {key}",
                "--max-examples",
                "25",
                "--seed",
                "26",
                "--workers",
                "1",
                "--request-timeout",
                "120",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
    summary = json.loads(report.read_text())
    start = run.stdout.find("FAILURES")
    details = run.stdout[start : start + 20000] if start >= 0 else run.stdout[-20000:] + run.stderr
    assert summary["failures"] == [] and summary["errors"] == [], details
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 39
    assert summary["test_cases"]["generated"] >= MIN_CASES, summary["test_cases"]
    print(f"\nschemathesis --checks all: {summary['test_cases']} over {summary['operations']['tested']} operations")
