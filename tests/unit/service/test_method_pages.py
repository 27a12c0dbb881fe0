"""The generated method pages: current with the code, honest about stale records, rendered for the dashboard."""

from __future__ import annotations

from api.method_pages import PAGES, expected_pages, load_records, record_status, to_html
from models.provenance import code_fingerprint
from models.registry import get_method, list_methods


def test_committed_method_pages_are_what_the_current_code_writes():
    expected = expected_pages()
    committed = {p.name: p.read_text(encoding="utf-8") for p in PAGES.glob("*.md")}
    assert set(committed) == set(expected), "run `crucible results --render` to add or drop method pages"
    stale = sorted(name for name, text in expected.items() if committed[name] != text)
    assert not stale, f"stale method pages {stale}: run `crucible results --render` (or `make results`)"


def test_every_registered_method_has_a_page_with_its_params_and_mechanism():
    pages = expected_pages()
    for spec in list_methods():
        if spec.family == "testing":
            continue
        page = pages[f"{spec.id}.md"]
        assert "## Mechanism" in page and "## Parameters" in page and "## Reproduction" in page
        for name in spec.params.model_fields:
            assert f"| `{name}` |" in page, f"{spec.id}: param {name} missing from its page"
    assert all(f"({s.id}.md)" in pages["README.md"] for s in list_methods() if s.family != "testing")


def test_a_record_is_stale_once_the_code_it_ran_changes():
    module = get_method("ldr").module
    current = {"method": "ldr", "code_hash": code_fingerprint(module).digest}
    assert record_status(current) == "current"
    assert record_status({**current, "code_hash": "0" * 16}) == "stale"
    assert record_status({"method": "ldr"}) == "unknown"


def test_page_route_renders_markdown_to_html(api):
    r = api.get("/api/v1/methods/ldr/page")
    assert r.status_code == 200
    body = r.json()
    assert body["markdown"].startswith("# `ldr`")
    assert "<h2>Parameters</h2>" in body["html"] and "<table>" in body["html"] and "## " not in body["html"]
    assert api.get("/api/v1/methods/no-such-method/page").status_code == 404


def test_raw_html_in_a_docstring_is_escaped_not_rendered():
    out = to_html("# t\n\n<script>alert(1)</script> and <img src=x onerror=alert(1)>")
    assert "<script>" not in out and "<img" not in out and "&lt;script&gt;" in out


def test_records_load_from_the_committed_results():
    records = load_records()
    assert records and all("method" in r for r in records.values())
