"""The method catalogue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from api.catalog import match_methods
from api.openapi import dynamic_enum
from api.problems import field_problem
from models.registry import get_method, list_methods

router = APIRouter(prefix="/api/v1/methods", tags=["methods"])


def families() -> list[str]:
    return sorted({m.family for m in list_methods()})


dynamic_enum("/api/v1/methods", "family", families)


@router.get("")
def methods(
    pattern: str = Query(
        "*", max_length=128, description="shell-style wildcard on the id or the family, e.g. 'llm-*' or 'ldr'"
    ),
    family: str | None = Query(None, max_length=64, description="only this family's methods"),
) -> dict[str, Any]:
    """Registered methods whose id or family matches `pattern`; `matched_by` says which of the two matched."""
    described = [m.describe() for m in list_methods()]
    if family is not None:
        known = families()
        if family not in known:
            raise field_problem("/family", f"unknown family {family!r}; use one of {', '.join(known)}")
        described = [m for m in described if m["family"] == family]
    items, matched_by = match_methods(described, pattern)
    return {"items": items, "matched_by": matched_by}


@router.get("/{method_id}")
def method_detail(method_id: str) -> dict[str, Any]:
    return get_method(method_id).describe()


@router.get("/{method_id}/page")
def method_page(method_id: str) -> dict[str, str]:
    """The method's generated documentation page (paper, mechanism, parameters, latest reproduction record)
    as Markdown and as HTML, for the dashboard's catalog."""
    from api.method_pages import rendered_page

    return rendered_page(method_id)
