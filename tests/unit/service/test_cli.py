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
    assert record["ours"] == 15.0 and record["seeds"] == 1
    # one seed measures no noise, so nothing holds beyond it
    assert record["verdict"] == "within noise" and record["holds"] is False
    assert record["code_hash"] and record["commit"]


def test_full_reproduction_holds_only_beyond_the_seed_noise():
    record = json.loads(CliRunner().invoke(main, ["reproduce", "test-counter", "--json", "--seed", "1"]).stdout)
    assert record["seeds"] == 3 and record["per_seed"]["ours"] == [1276.0, 1277.0, 1275.0]
    assert record["improvement_se"] > 0 and record["verdict"] == "holds" and record["holds"] is True


def test_unreachable_api_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CRUCIBLE_API_URL", "http://127.0.0.1:9")
    out = CliRunner().invoke(main, ["jobs"])
    assert out.exit_code == 2 and "cannot reach the Crucible API" in out.output
