"""/docs (Swagger UI) and /redoc render with the network cut off: their scripts come from the server itself."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from tests.browser.conftest import LAPTOP
from tests.e2e.test_server import Server

pytest.importorskip("playwright", reason="the Python playwright package is missing (pip install -e '.[test]')")
from playwright.sync_api import Browser, Page, Route, expect  # noqa: E402

pytestmark = pytest.mark.e2e
LOCAL = ("127.0.0.1", "localhost")


@pytest.fixture
def offline(browser: Browser, dash_server: Server) -> Iterator[tuple[Page, list[str]]]:
    """A page whose every request off this machine is aborted (as on a laptop without a network);
    yields it and the list of the URLs it tried to fetch from elsewhere."""
    context = browser.new_context(viewport=LAPTOP, base_url=dash_server.url)
    context.set_default_timeout(20_000)
    blocked: list[str] = []

    def only_local(route: Route) -> None:
        url = route.request.url
        if urlparse(url).hostname in LOCAL or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", only_local)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page, blocked
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_swagger_ui_renders_offline(offline):
    page, blocked = offline
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Crucible")
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/jobs").first).to_be_visible()
    assert blocked == []


def test_redoc_renders_offline(offline):
    page, blocked = offline
    page.goto("/redoc")
    expect(page.get_by_role("heading", name="Crucible", level=1)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("/api/v1/jobs/{job_id}/metrics").first).to_be_attached()
    # ReDoc's sidebar credit ("API docs by Redocly") links its logo from Redocly's CDN; nothing else leaves
    assert [url for url in blocked if not url.endswith("/redoc/logo-mini.svg")] == []
