"""The method catalogue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from models.registry import get_method, list_methods

router = APIRouter(prefix="/api/v1/methods", tags=["methods"])


@router.get("")
def methods(
    pattern: str = Query("*", description="shell-style wildcard on the id, e.g. 'llm-*'"), family: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    return {"items": [m.describe() for m in list_methods(pattern, family)]}


@router.get("/{method_id}")
def method_detail(method_id: str) -> dict[str, Any]:
    return get_method(method_id).describe()


@router.get("/{method_id}/page")
def method_page(method_id: str) -> dict[str, str]:
    """The method's generated documentation page (paper, mechanism, parameters, latest reproduction record)
    as Markdown and as HTML, for the dashboard's catalog."""
    from api.method_pages import rendered_page

    return rendered_page(method_id)
