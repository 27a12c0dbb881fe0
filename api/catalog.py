"""The method catalog as the CLI and `GET /api/v1/methods` filter it: a pattern matches ids and families.

`crucible methods 'llm-*'` means "the LLM methods" to a reader of the README, and no method id starts with
`llm-` while three families do; so a pattern selects the methods whose id or family it matches, and says which.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any


def match_methods(items: Sequence[dict[str, Any]], pattern: str = "*") -> tuple[list[dict[str, Any]], list[str]]:
    """The described methods (dicts with `id` and `family`) whose id or family matches the shell-style
    `pattern`, sorted by id, and what it matched: `["id"]`, `["family"]`, both, or `[]` when nothing did."""
    by_id = {m["id"] for m in items if fnmatch.fnmatchcase(m["id"], pattern)}
    by_family = {m["id"] for m in items if fnmatch.fnmatchcase(m["family"], pattern)}
    matched = sorted((m for m in items if m["id"] in by_id | by_family), key=lambda m: m["id"])
    if pattern in ("", "*"):
        return matched, ["id"] if matched else []
    return matched, [what for what, hits in (("id", by_id), ("family", by_family)) if hits]


def describe_match(pattern: str, items: Sequence[dict[str, Any]], matched_by: Sequence[str]) -> str:
    """One line saying what `pattern` matched, e.g. "'llm-*' matched the families llm-compression, llm-inference"."""
    parts = []
    if "family" in matched_by:
        families = sorted({m["family"] for m in items if fnmatch.fnmatchcase(m["family"], pattern)})
        parts.append(f"the famil{'y' if len(families) == 1 else 'ies'} {', '.join(families)}")
    if "id" in matched_by:
        ids = [m["id"] for m in items if fnmatch.fnmatchcase(m["id"], pattern)]
        parts.append(f"{len(ids)} method id{'' if len(ids) == 1 else 's'}")
    return f"{pattern!r} matched " + " and ".join(parts)
