"""A real `crucible up` server and Debian's chromium driven by Playwright (never Playwright's own
browser builds). `scripts/setup/browser.sh` installs chromium; without it these tests skip, saying why.

Screenshots of the main pages land in .crucible-test/screenshots/ (or $CRUCIBLE_SCREENSHOTS); the
ones committed under docs/screenshots/ come from `CRUCIBLE_SCREENSHOTS=docs/screenshots`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURE_PLUGINS
from tests.e2e.test_server import REPO, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    expect.set_options(timeout=20_000)  # a first /methods call imports every method module: seconds on 2 cores
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None


def _skip_reason() -> str | None:
    if sync_playwright is None:
        return "the Python playwright package is missing (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing; run scripts/setup/browser.sh as root (apt-get install chromium)"
    return None


class DashboardServer(Server):
    """The e2e server on the service's default heartbeat and lease: a real method's imports on a busy
    2-core machine outlast the e2e suite's 6-second lease, and this suite tests the page, not the reaper."""

    def start(self) -> None:
        env = {
            **os.environ,
            "CRUCIBLE_HOME": str(self.home),
            "CRUCIBLE_PLUGINS": FIXTURE_PLUGINS,
            "CRUCIBLE_CANCEL_GRACE_S": "2",
            "CRUCIBLE_METRIC_FLUSH_S": "0.3",
            "CRUCIBLE_DEMO_JOB": "false",
        }
        log = open(self.home.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "up", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._await_ready()


@pytest.fixture(scope="session")
def dash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("dashboard") / "home"
    home.mkdir()
    srv = DashboardServer(home)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser(dash_server: Server) -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, dash_server: Server) -> Iterator[Page]:
    """A laptop-sized page on the dashboard; a JavaScript error anywhere fails the test."""
    context = browser.new_context(viewport=LAPTOP, base_url=dash_server.url)
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(f"/?token={dash_server.key}")  # the login link `crucible up` prints: sets the session cookie
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def shots() -> Path:
    out = Path(os.environ.get("CRUCIBLE_SCREENSHOTS") or REPO / ".crucible-test" / "screenshots")
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(pg: Page, shots: Path, name: str, **kw: Any) -> Path:
    """A PNG of the page, reduced to a 256-colour palette (a third of the bytes; UI colours survive)."""
    from PIL import Image

    path = shots / f"{name}.png"
    pg.screenshot(path=str(path), **kw)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path
