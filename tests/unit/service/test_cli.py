"""CLI commands that need no server."""

import json

from click.testing import CliRunner

from api.cli import main


def test_methods_json_lists_the_contract_fields():
    out = CliRunner().invoke(main, ["methods", "--json"])
    assert out.exit_code == 0, out.output
    items = json.loads(out.stdout)
    assert {"id", "family", "task", "paper", "params", "datasets", "reproduction"} <= set(items[0])


def test_methods_pattern_filters():
    items = json.loads(CliRunner().invoke(main, ["methods", "test-*", "--json"]).stdout)
    assert [m["id"] for m in items] == ["test-counter", "test-sleep"]


def test_reproduce_prints_the_record_shape():
    out = CliRunner().invoke(main, ["reproduce", "test-counter", "--smoke", "--json"])
    record = json.loads(out.stdout)
    assert {"method", "claim", "metric", "ours", "baseline", "direction", "holds", "seconds", "seed"} <= set(record)
    assert record["holds"] is True and record["ours"] == 15.0


def test_unreachable_api_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CRUCIBLE_API_URL", "http://127.0.0.1:9")
    out = CliRunner().invoke(main, ["jobs"])
    assert out.exit_code == 2 and "cannot reach the Crucible API" in out.output
