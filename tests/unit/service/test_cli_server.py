"""The CLI against a server on loopback: listing, showing and submitting stay light (no torch), patterns match
families, and the commands a user reaches for (retry, delete, quotas, deploy delete) exist and say what they did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from rich.console import Console

import api.cli
from api.app import create_app
from api.auth import bootstrap_admin_key
from api.cli import main
from tests.conftest import make_key
from tests.unit.service.attacks import live_server

REPO = Path(__file__).resolve().parents[3]
# runs the CLI as `crucible` would, then says on stderr whether torch was imported on the way
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('\\nTORCH ' + str('torch' in sys.modules) + '\\n'))\n"
    "from api.cli import main\n"
    "main(prog_name='crucible')\n"
)


@pytest.fixture
def server(settings, monkeypatch) -> Iterator[tuple[str, str]]:
    """A live API (no executor) and the CLI's environment pointing at it; yields (url, operator key)."""
    key = bootstrap_admin_key(settings)
    with live_server(create_app(settings, run_executor=False)) as port:
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("CRUCIBLE_API_URL", url)
        monkeypatch.setenv("CRUCIBLE_API_KEY", key)
        yield url, key


def cli(*args: str) -> tuple[int, str, str]:
    """`crucible ARGS` in a fresh interpreter (this process has torch loaded already)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def test_listing_showing_and_submitting_never_import_torch(server):
    url, key = server
    for args in (["methods"], ["methods", "llm-*"], ["datasets"], ["jobs"]):
        code, out, errors = cli(*args)
        assert code == 0, (args, out, errors)
        assert errors.rstrip().endswith("TORCH False"), (args, errors)
    code, out, errors = cli("submit", "test-counter", "-p", "steps=3", "--json")
    assert code == 0 and errors.rstrip().endswith("TORCH False"), errors
    job_id = json.loads(out)["id"]
    code, out, errors = cli("show", job_id)
    assert code == 0 and job_id in out and errors.rstrip().endswith("TORCH False"), errors


def test_without_a_server_methods_loads_the_registry_and_prints_no_library_noise(monkeypatch, tmp_path):
    monkeypatch.setenv("CRUCIBLE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    code, out, errors = cli("methods", "llm-*")
    assert code == 0 and "squarehead" in out, errors
    noise = [line for line in errors.splitlines() if line.strip() and not line.startswith(("TORCH", "'llm-*'"))]
    assert noise == [
        "no Crucible server at http://127.0.0.1:9; loading the method registry in this process (imports torch)"
    ]


def test_a_pattern_matches_families_and_says_so():
    out = CliRunner().invoke(main, ["methods", "llm-*"])
    assert out.exit_code == 0, out.output
    assert "'llm-*' matched the families llm-compression, llm-inference, llm-training" in out.stderr
    ids = {m["id"] for m in json.loads(CliRunner().invoke(main, ["methods", "llm-*", "--json"]).stdout)}
    assert {"squarehead", "ems", "stable-spam"} <= ids and "ldr" not in ids
    out = CliRunner().invoke(main, ["methods", "testing"])
    assert "'testing' matched the family testing" in out.stderr and "test-counter" in out.stdout
    out = CliRunner().invoke(main, ["methods", "zz-*"])
    assert out.exit_code == 1 and "no method matches 'zz-*'" in out.stderr and "┃" not in out.stdout


def test_the_methods_route_matches_families_too(api):
    body = api.get("/api/v1/methods", params={"pattern": "llm-*"}).json()
    assert body["matched_by"] == ["family"] and {m["family"] for m in body["items"]} >= {"llm-training"}
    assert api.get("/api/v1/methods", params={"family": "testing"}).json()["items"][0]["id"] == "test-counter"
    r = api.get("/api/v1/methods", params={"family": "bogus"})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/family"


def test_paper_titles_end_at_the_terminal_edge(monkeypatch):
    from models.registry import list_methods

    spec = max(list_methods(), key=lambda m: len(m.paper))
    assert len(spec.paper) > 70
    monkeypatch.setattr(api.cli, "console", Console(width=400, force_terminal=True))
    wide = CliRunner().invoke(main, ["methods", spec.id])
    assert spec.paper in wide.stdout  # the whole title where it fits (it was cut at 70 columns)
    monkeypatch.setattr(api.cli, "console", Console(width=100, force_terminal=True))
    narrow = CliRunner().invoke(main, ["methods", spec.id])
    row = next(line for line in narrow.stdout.splitlines() if spec.id in line)
    assert "…" in row and len(row) <= 100


def test_retry_and_delete(server, settings):
    url, key = server
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
    job = http.post("/api/v1/jobs", json={"method": "test-counter", "params": {"steps": 3}}).json()
    http.post(f"/api/v1/jobs/{job['id']}/cancel")  # a queued job ends at once: terminal, so it can be retried
    out = CliRunner().invoke(main, ["retry", job["id"], "--json"])
    assert out.exit_code == 0, out.output
    again = json.loads(out.stdout)
    assert again["parent_id"] == job["id"] and again["status"] == "queued"
    out = CliRunner().invoke(main, ["delete", job["id"]])
    assert out.exit_code == 0 and f"deleted job {job['id']}" in out.stdout
    assert http.get(f"/api/v1/jobs/{job['id']}").status_code == 404
    out = CliRunner().invoke(main, ["delete", again["id"]])  # still queued: the server's 409 is the message
    assert out.exit_code == 1 and "cancel it first" in out.output


def test_project_create_sets_quotas_only_for_the_operator(server, settings, monkeypatch):
    out = CliRunner().invoke(main, ["project-create", "beta", "--max-active-jobs", "3", "--max-stored", "2G"])
    assert out.exit_code == 0, out.output
    assert "at most 3 active jobs, 2147483648 bytes stored" in out.stdout and out.stdout.strip().splitlines()[-1]
    out = CliRunner().invoke(main, ["project-quotas", "beta", "--max-active-jobs", "5", "--default", "max-stored"])
    assert out.exit_code == 0 and "at most 5 active jobs, the default storage stored" in out.stdout, out.output
    monkeypatch.setenv("CRUCIBLE_API_KEY", make_key(settings))  # an admin of a project, not the operator
    out = CliRunner().invoke(main, ["project-create", "gamma", "--max-active-jobs", "3"])
    assert out.exit_code == 1 and "(403)" in out.output
    out = CliRunner().invoke(main, ["project-create", "gamma", "--max-stored", "lots"])
    assert out.exit_code == 2 and "--max-stored" in out.output


def test_every_command_says_what_it_does():
    for path in (["deploy", "delete"], ["retry"], ["delete"], ["project-create"], ["project-quotas"]):
        out = CliRunner().invoke(main, [*path, "--help"])
        assert out.exit_code == 0
        summary = out.stdout.split("Options:")[0].split("\n\n", 1)[1].strip()
        assert len(summary) > 20, (path, out.stdout)


def test_the_login_link_is_printed_whole_on_a_line_of_its_own(settings):
    key = "cru_" + "x" * 60
    lines = api.cli.banner("http://127.0.0.1:8000", settings, key, terminal=True)
    assert f"  http://127.0.0.1:8000/?token={key}" in lines
    assert not any(key in line for line in api.cli.banner("http://127.0.0.1:8000", settings, key, terminal=False))
