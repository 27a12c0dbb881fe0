"""One generated page per method, `docs/methods/<id>.md`, and the catalog `docs/methods/README.md`.

A page is written from what the code already says, so it cannot drift from it: the registry's
metadata (paper, family, task, dataset kinds), the method module's docstring (the mechanism, its
equations, defaults and what is reconstructed), a params table from the params model's JSON schema
(type, default, bounds, description) and the method's latest reproduction record from
`docs/results.json` (with its spread, its verdict, and whether the code that produced it has changed
since). `crucible results` rewrites the pages with the records; `crucible results --render` rewrites
them (and `docs/results.md`) from the stored records alone; a test fails when a committed page differs
from what the current code would write. The dashboard shows the same page, rendered, per method.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from models.provenance import code_fingerprint
from models.registry import MethodSpec, UnknownMethodError, get_method, list_methods
from models.reproduction import ReproductionSpec, list_reproductions

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS_JSON = DOCS / "results.json"
PAGES = DOCS / "methods"
# paragraphs of a docstring that say where the implementation leaves the paper; collected on the page
DEVIATION_WORDS = (
    "reconstruct",
    "deviat",
    "deliberate difference",
    "differs from the",
    "our reading",
    "unverified",
    "unlike the paper",
    "unlike the reference",
    "not the paper",
)


def load_records(path: Path = RESULTS_JSON) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {r["method"]: r for r in json.loads(path.read_text(encoding="utf-8"))}


def record_status(record: dict[str, Any]) -> str:
    """'current', 'stale' (the method's code changed since the record) or 'unknown' (no code hash kept)."""
    if "error" in record:
        return "error"
    recorded = record.get("code_hash")
    if not recorded:
        return "unknown"
    try:
        module = get_method(record["method"]).module
    except UnknownMethodError:  # a record of a method no longer registered
        return "stale"
    return "current" if code_fingerprint(module).digest == recorded else "stale"


def module_doc(spec: MethodSpec) -> str:
    return inspect.cleandoc(importlib.import_module(spec.module).__doc__ or "")


def deviations(doc: str) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc)]
    return [p for p in paragraphs if any(w in p.lower() for w in DEVIATION_WORDS)]


def _type_of(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(_type_of(s) for s in schema["anyOf"])
    return str(schema.get("type", "any"))


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{sign} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    return ", ".join(parts)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def params_table(spec: MethodSpec) -> list[str]:
    schema = spec.params_schema()
    props = schema.get("properties", {})
    if not props:
        return ["This method takes no parameters."]
    lines = ["| name | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, prop in props.items():
        default = json.dumps(prop["default"], ensure_ascii=False) if "default" in prop else "(required)"
        lines.append(
            f"| `{name}` | {_cell(_type_of(prop))} | `{_cell(default)}` | {_cell(_bounds(prop))} | "
            f"{_cell(prop.get('description', ''))} |"
        )
    return lines


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def _with_spread(record: dict[str, Any], key: str) -> str:
    spread = record.get(f"{key}_std")
    return _number(record.get(key)) + (f" ± {spread:.2g}" if isinstance(spread, (int, float)) else "")


def reproduction_section(repro: ReproductionSpec | None, record: dict[str, Any] | None) -> list[str]:
    if repro is None:
        return ["This method has no reproduction."]
    lines = [
        f"**Claim.** {repro.claim}",
        "",
        f"**Metric.** {repro.metric} ({repro.direction} is better), against {repro.baseline}.",
        "",
        f"Run it: `crucible reproduce {repro.method_id}` (`--smoke` for the seconds-long configuration).",
        "",
    ]
    if record is None:
        return [*lines, "No recorded run yet."]
    if "error" in record:
        return [*lines, f"The last recorded run failed: {record['error'].splitlines()[-1]}"]
    status = record_status(record)
    # records written before the per-seed rule carry no verdict: say which rule decided them
    verdict = record.get("verdict") or ("holds" if record.get("holds") else "does not hold") + " (one-run rule)"
    lines += [
        "| ours | baseline | verdict | holds | seeds | recorded |",
        "|---|---|---|---|---|---|",
        f"| {_with_spread(record, 'ours')} | {_with_spread(record, 'baseline')} | {verdict} | "
        f"{'yes' if record.get('holds') else 'no'} | {record.get('seeds', '—')} | "
        f"{record.get('measured_at', '—')} |",
        "",
    ]
    if record.get("per_seed"):
        margin = record.get("margin")
        beyond = (
            f" beyond the claim's margin of {margin['value']:g}{' × the baseline' if margin['relative'] else ''}"
            if margin
            else ""
        )
        lines += [
            f"Per seed: ours {record['per_seed']['ours']}, baseline {record['per_seed']['baseline']}; mean "
            f"improvement{beyond} {_number(record.get('improvement'))} (standard error "
            f"{_number(record.get('improvement_se'))}).",
            "",
        ]
    if record.get("checks"):
        lines += ["The claim's further comparisons, each judged over the same seeds:", ""]
        lines += ["| comparison | ours | baseline | gain beyond margin | standard error | verdict |"]
        lines += ["|---|---|---|---|---|---|"]
        for c in record["checks"]:
            lines.append(
                f"| {_cell(c['name'])} | {_number(c['ours'])} | {_number(c['baseline'])} | "
                f"{_number(c['gain_beyond_margin'])} | {_number(c['se'])} | {c['verdict']} |"
            )
        lines.append("")
    provenance = {
        "current": "The method's code is unchanged since this record.",
        "stale": "**Stale:** the method's code (or a kit it imports) changed since this record; re-run it.",
        "unknown": "This record predates code hashes in records; re-run it to tie it to the code.",
    }[status]
    commit = record.get("commit")
    lines.append(provenance + (f" Recorded at commit `{commit}`, code hash `{record['code_hash']}`." if commit else ""))
    if record.get("note"):
        lines += ["", f"**Note.** {record['note']}"]
    return lines


def method_page(spec: MethodSpec, repro: ReproductionSpec | None, record: dict[str, Any] | None) -> str:
    doc = module_doc(spec)
    lines = [
        f"# `{spec.id}`: {spec.paper}",
        "",
        "Generated from the code by `crucible results`; do not edit by hand.",
        "",
        f"- **Family:** {spec.family} · **task:** {spec.task} · **datasets:** "
        + (", ".join(f"`{k}`" for k in spec.datasets) or "none (it builds its own data)"),
        f"- **Module:** `{spec.module}`",
        f"- **Summary:** {spec.summary}" if spec.summary else "",
        "",
        "## Mechanism",
        "",
        doc or "(no module docstring)",
        "",
        "## Parameters",
        "",
        *params_table(spec),
        "",
    ]
    found = deviations(doc)
    if found:
        lines += ["## What is reconstructed or deviates", "", *(f"- {p}" for p in found), ""]
    lines += ["## Reproduction", "", *reproduction_section(repro, record), ""]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


def catalog_page(specs: list[MethodSpec], records: dict[str, dict[str, Any]]) -> str:
    families: dict[str, list[MethodSpec]] = {}
    for spec in specs:
        families.setdefault(spec.family, []).append(spec)
    lines = [
        "# Method catalog",
        "",
        "Generated from the registry by `crucible results`; do not edit by hand. One page per method: its",
        "paper, mechanism, parameters and latest reproduction record.",
        "",
    ]
    for family in sorted(families):
        lines += [f"## {family}", "", "| method | paper | task | claim holds |", "|---|---|---|---|"]
        for spec in families[family]:
            record = records.get(spec.id)
            verdict = "—" if record is None or "error" in record else ("yes" if record.get("holds") else "no")
            lines.append(f"| [`{spec.id}`]({spec.id}.md) | {_cell(spec.paper)} | {spec.task} | {verdict} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def expected_pages(records: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """file name → content, for every registered method (the service's test fixtures excluded)."""
    records = load_records() if records is None else records
    repros = {r.method_id: r for r in list_reproductions()}
    specs = [s for s in list_methods() if s.family != "testing"]
    pages = {f"{s.id}.md": method_page(s, repros.get(s.id), records.get(s.id)) for s in specs}
    pages["README.md"] = catalog_page(specs, records)
    return pages


def write_pages(out: Path = PAGES, records: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pages = expected_pages(records)
    for stale in set(p.name for p in out.glob("*.md")) - set(pages):
        (out / stale).unlink()
    written = []
    for name, text in pages.items():
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def rendered_page(method_id: str) -> dict[str, str]:
    """The page of one method as Markdown and as HTML (raw HTML in the Markdown is escaped, not passed)."""
    spec = get_method(method_id)
    repros = {r.method_id: r for r in list_reproductions(spec.id)}
    text = method_page(spec, repros.get(spec.id), load_records().get(spec.id))
    return {"id": spec.id, "markdown": text, "html": to_html(text)}


def to_html(markdown: str) -> str:
    """CommonMark with tables; raw HTML in the text is escaped, never passed through."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
