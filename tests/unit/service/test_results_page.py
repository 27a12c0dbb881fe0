"""docs/results.md: spread and verdict per record, stale records marked, verdicts the per-seed rule changed."""

from __future__ import annotations

from api.results import changed_verdicts, previous_of, render
from models.provenance import code_fingerprint
from models.registry import get_method

OLD = {"method": "ldr", "holds": True, "ours": 0.96, "baseline": 0.94, "seeds": 1, "claim": "c", "metric": "m"}


def record(**over):
    base = {
        "method": "ldr",
        "claim": "c",
        "metric": "m",
        "baseline_name": "ce",
        "direction": "higher",
        "ours": 0.95,
        "baseline": 0.94,
        "ours_std": 0.01,
        "baseline_std": 0.02,
        "verdict": "within noise",
        "holds": False,
        "seeds": 3,
        "seconds": 10.0,
        "code_hash": code_fingerprint(get_method("ldr").module).digest,
    }
    return base | over


def test_a_rerun_remembers_the_one_run_record_through_later_reruns():
    first = record(previous=previous_of(OLD))
    assert first["previous"]["one_run_rule"]["holds"] is True
    second = record(previous=previous_of(first))
    assert second["previous"]["one_run_rule"] == first["previous"]["one_run_rule"]


def test_changed_verdicts_lists_records_whose_verdict_flipped():
    flipped = record(previous=previous_of(OLD), note="the gain is within the seed noise")
    kept = record(method="x", holds=True, verdict="holds", previous=previous_of({**OLD, "method": "x"}))
    lines = changed_verdicts([flipped, kept])
    assert len(lines) == 1 and "`ldr` held" in lines[0] and "within noise" in lines[0] and "seed noise" in lines[0]


def test_page_shows_spread_verdict_and_stale_records():
    page = render([record(), record(method="ldr", code_hash="0" * 16)], smoke=False)
    assert "0.95 ± 0.01" in page and "within noise" in page
    assert "(*stale*)" in page and "Stale (code changed since): `ldr`" in page


def test_store_keeps_other_records_and_remembers_the_replaced_one(tmp_path, monkeypatch):
    from api import results

    monkeypatch.setattr(results, "write_pages", lambda out, records: None)
    out = tmp_path / "results.md"
    results.store(out, {**OLD, "baseline_name": "ce", "direction": "higher", "seconds": 1.0})
    results.store(out, record(method="other"))
    results.store(out, record(note="re-run"))
    import json

    stored = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(stored) == {"ldr", "other"}
    assert stored["ldr"]["note"] == "re-run" and stored["ldr"]["previous"]["one_run_rule"]["holds"] is True
    assert "Verdicts the per-seed rule changed" in out.read_text()


def test_a_record_carries_its_cold_and_warm_times_across_runs(tmp_path, monkeypatch):
    import json

    from api import results
    from api.results import seconds_cell

    monkeypatch.setattr(results, "write_pages", lambda out, records: None)
    out = tmp_path / "results.md"
    results.store(out, record(seconds=600.0, cold=True, built=["llm-base/x"]))
    results.store(out, record(seconds=12.0, cold=False, built=[]))
    (stored,) = json.loads(out.with_suffix(".json").read_text())
    assert stored["warm_seconds"] == 12.0 and stored["cold_seconds"] == 600.0
    assert seconds_cell(stored) == "12; cold 600"
    assert "| 12; cold 600 |" in out.read_text()
