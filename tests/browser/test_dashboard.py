"""The dashboard in a real headless chromium against the real `crucible up` server.

A newcomer's path: submit from the form and watch the job finish with a chart drawn, open an image
artifact, cancel a running job, see the API's validation error next to the field, browse the
catalog, compare and models pages, and page through 10,000 jobs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from tests.browser.conftest import PHONE, screenshot
from tests.e2e.test_server import Server

pytest.importorskip("playwright", reason="the Python playwright package is missing (pip install -e '.[test]')")
from datetime import UTC

from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.e2e
JOB_URL = re.compile(r"#/jobs/[0-9A-Z]{26}$")
LINE = ".scatterlayer .trace path.js-line"


@pytest.fixture(scope="session")
def image_job(dash_server: Server) -> str:
    """A real method run that saves a PNG plot; submitted early so it runs while other tests do."""
    return dash_server.submit(method="ldr", dataset="digits", params={"noise_rate": 0.4, "epochs": 2})


def job_id_of(page: Page) -> str:
    return page.url.rsplit("/", 1)[-1]


def test_submit_from_form_runs_to_succeeded_with_a_chart(page: Page, dash_server: Server, image_job: str, shots: Path):
    page.goto("/#/submit?method=test-counter")
    expect(page.get_by_label("Method", exact=True)).to_have_value("test-counter")
    expect(page.get_by_label("Dataset", exact=True)).to_be_disabled()  # the fixture method makes its own data
    page.get_by_label("Steps", exact=True).fill("12")
    page.get_by_label("Step Seconds", exact=True).fill("0.1")
    page.get_by_role("button", name="Submit job").click()

    page.wait_for_url(JOB_URL)
    job = dash_server.wait_status(job_id_of(page), ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["status"] == "succeeded" and job["params"]["steps"] == 12, job
    expect(page.locator("h1 .status")).to_have_text("succeeded")
    expect(page.locator(f'.chart[data-metric="value"] {LINE}')).to_have_count(1)
    expect(page.locator("#log")).to_contain_text("counter starting at step 0")
    result = page.locator("details.preview", has_text="result.json")
    expect(result.locator("table")).to_contain_text("total")
    expect(page.get_by_role("button", name="Re-run")).to_be_visible()


def test_open_an_image_artifact(page: Page, dash_server: Server, image_job: str, shots: Path):
    job = dash_server.wait_status(image_job, ("succeeded", "failed", "cancelled"), timeout=240)
    assert job["status"] == "succeeded", job["failure"]
    page.goto(f"/#/jobs/{image_job}")
    expect(page.locator("h1 .status")).to_have_text("succeeded")
    expect(page.locator(f".chart {LINE}").first).to_be_visible()
    thumb = page.get_by_role("button", name=re.compile(r"Open image .*\.png"))
    expect(thumb.first).to_be_visible()
    screenshot(page, shots, "job", full_page=True)
    thumb.first.click()

    dialog = page.locator("dialog#lightbox")
    expect(dialog).to_be_visible()
    image = dialog.locator("img")
    expect(image).to_have_attribute("src", re.compile(rf"/api/v1/jobs/{image_job}/artifacts/.+\.png$"))
    page.wait_for_function("document.querySelector('#lightbox-img').naturalWidth > 0")
    screenshot(page, shots, "image-artifact")
    download = dialog.get_by_role("link", name="Download")
    assert dash_server.http.get(download.get_attribute("href")).headers["content-type"] == "image/png"
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    phone = page.context.new_page()
    phone.set_viewport_size(PHONE)
    phone.goto(f"/#/jobs/{image_job}")
    expect(phone.locator(f".chart {LINE}").first).to_be_visible()
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    screenshot(phone, shots, "job-phone")


def test_cancel_a_running_job(page: Page, dash_server: Server):
    job_id = dash_server.submit(method="test-counter", params={"steps": 5000, "step_seconds": 0.05})
    metric_requests: list[str] = []
    page.on("request", lambda r: metric_requests.append(r.url) if "/metrics" in r.url else None)
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("h1 .status")).to_have_text("running", timeout=120_000)
    expect(page.locator(f'.chart[data-metric="value"] {LINE}')).to_have_count(1)  # a live chart while it runs
    if not any("since_step=" in u for u in metric_requests):  # later polls fetch only the new points
        page.wait_for_event("request", lambda r: "/metrics" in r.url and "since_step=" in r.url, timeout=30_000)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("h1 .status")).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.get_by_role("button", name="Re-run")).to_be_visible()
    assert dash_server.job(job_id)["status"] == "cancelled"

    page.get_by_role("link", name="Edit & run again").click()  # the form, filled with this job's spec
    expect(page.get_by_label("Method", exact=True)).to_have_value("test-counter")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("5000")
    expect(page.get_by_label("Step Seconds", exact=True)).to_have_value("0.05")


def test_delete_a_finished_job(page: Page, dash_server: Server):
    job_id = dash_server.submit(method="test-counter", params={"steps": 2})
    dash_server.wait_status(job_id, ("succeeded",), timeout=120)
    page.goto(f"/#/jobs/{job_id}")
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete job …?"
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url(re.compile(r"#/jobs$"))
    assert dash_server.http.get(f"/api/v1/jobs/{job_id}").status_code == 404
    expect(page.locator(f'#rows tr[data-id="{job_id}"]')).to_have_count(0)


def test_validation_error_is_shown_next_to_its_field(page: Page, dash_server: Server, shots: Path):
    before = jobs_count(dash_server)
    page.goto("/#/submit?method=test-counter")
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("0")
    steps.press("Enter")  # the keyboard alone submits

    field = page.locator('[data-pointer="/params/steps"]')
    expect(field.locator(".error")).to_contain_text("greater than or equal to 1")
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_be_focused()
    expect(page.get_by_role("alert")).to_contain_text("not submitted")
    assert page.url.endswith("#/submit?method=test-counter") and jobs_count(dash_server) == before
    screenshot(page, shots, "submit-error")

    steps.fill("3")  # correcting the value clears its message
    expect(field.locator(".error")).to_be_hidden()

    page.get_by_label("Method", exact=True).select_option("ldr")
    kinds = set(dash_server.http.get("/api/v1/methods/ldr").json()["datasets"])
    fitting = {d["name"] for d in dash_server.http.get("/api/v1/datasets").json()["items"] if d["kind"] in kinds}
    offered = set(page.get_by_label("Dataset", exact=True).locator("option").evaluate_all("os => os.map(o => o.value)"))
    assert offered == fitting and offered
    expect(page.get_by_label("Noise Rate", exact=True)).to_have_value("0")  # defaults from the schema
    screenshot(page, shots, "submit", full_page=True)


def test_catalog_compare_and_models_pages(page: Page, dash_server: Server, image_job: str, shots: Path):
    dash_server.wait_status(image_job, ("succeeded",), timeout=240)
    page.goto("/#/jobs")
    expect(page.locator("#rows tr[data-id]").first).to_be_visible()
    screenshot(page, shots, "jobs")

    page.goto("/#/catalog")
    for family in ("classification", "testing"):
        expect(page.get_by_role("heading", name=re.compile(family, re.I), level=2)).to_be_visible()
    ldr = page.locator("article#m-ldr")
    expect(ldr).to_contain_text("Label Distributionally Robust")
    expect(ldr).to_contain_text("reproduction")
    screenshot(page, shots, "catalog", full_page=True)

    ldr.get_by_role("link", name="How it works").click()  # the method's page, rendered from its code
    doc = page.locator("#method-page")
    expect(doc.get_by_role("heading", name="Parameters", level=2)).to_be_visible()
    expect(doc.locator("table").first).to_contain_text("noise_rate")
    expect(doc).to_contain_text("ALDR-KL")
    expect(doc).not_to_contain_text("## Mechanism")  # rendered, not raw Markdown
    screenshot(page, shots, "method-page", full_page=True)

    baseline = dash_server.submit(method="test-counter", params={"steps": 8})
    other = dash_server.submit(method="test-counter", params={"steps": 10})
    for job_id in (baseline, other):
        dash_server.wait_status(job_id, ("succeeded",), timeout=120)
    page.goto(f"/#/compare?jobs={baseline},{other}")
    chart = page.locator(".chart").first
    expect(chart.locator(LINE)).to_have_count(2)
    expect(chart).to_contain_text("steps=8")  # legends name the parameter that differs
    expect(page.locator("table", has_text="Parameters that differ")).to_contain_text("steps")
    screenshot(page, shots, "compare", full_page=True)

    page.goto("/#/models")
    row = page.locator("tr", has_text="counter@1")
    expect(row.get_by_role("link", name=re.compile("test-counter"))).to_be_visible()
    config = row.locator("details.config")  # the headline of the config, the whole of it one click away
    expect(config.locator("summary")).to_be_visible()
    config.locator("summary").click()
    expect(config.locator("pre")).to_be_visible()
    expect(page.locator("#deployments")).to_contain_text("No deployments")  # the API answers; none made yet
    screenshot(page, shots, "models")


def test_jobs_list_pages_through_10000_jobs(page: Page, dash_server: Server, shots: Path):
    add_finished_jobs(dash_server, 10_000)
    page.goto("/#/jobs")
    rows = page.locator("#rows tr[data-id]")
    expect(rows).to_have_count(50)
    expect(page.locator("#jobs-count")).to_have_text("Jobs 1–50")
    first = rows.first.get_attribute("data-id")
    for _ in range(3):
        page.get_by_role("button", name="Older →").click()
    expect(page.locator("#jobs-count")).to_have_text("Jobs 151–200")
    assert rows.first.get_attribute("data-id") < first
    page.get_by_role("button", name="← Newer").click()
    expect(page.locator("#jobs-count")).to_have_text("Jobs 101–150")

    started = time.perf_counter()
    page.get_by_label("Status", exact=True).select_option("failed")
    expect(rows.first.locator(".status")).to_have_text("failed")
    page.get_by_label("Search", exact=True).fill("bulk")
    expect(page.locator("#jobs-count")).to_have_text("Jobs 1–50")
    expect(rows.first).to_contain_text("bulk-set")
    assert time.perf_counter() - started < 10  # each filter is one indexed query, not a scan in the page

    for _ in range(3):  # deep pages cost what the first one does
        r = dash_server.http.get("/api/v1/jobs", params={"limit": 50, "cursor": first})
        assert r.status_code == 200 and len(r.json()["items"]) == 50
        first = r.json()["items"][-1]["id"]
    phone = page.context.new_page()
    phone.set_viewport_size(PHONE)
    phone.goto("/#/jobs")
    expect(phone.locator("#rows tr[data-id]")).to_have_count(50)
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    screenshot(phone, shots, "jobs-phone")


def jobs_count(server: Server) -> int:
    from workers.db import session_scope
    from workers.tables import Job

    with session_scope(f"sqlite:///{server.home / 'crucible.db'}") as s:
        return s.scalar(select(func.count()).select_from(Job))


def add_finished_jobs(server: Server, n: int) -> None:
    """Rows as finished jobs leave them, written straight to the server's database (fast to make)."""
    from datetime import datetime, timedelta

    from workers.db import session_scope
    from workers.tables import Job, new_id

    now = datetime.now(UTC)
    statuses = ("succeeded", "failed", "cancelled")
    rows: list[dict[str, Any]] = [
        {
            "id": new_id(),
            "method": "test-counter",
            "dataset": "bulk-set" if i % 2 else None,
            "mode": "run",
            "params": {"steps": i},
            "resources": {},
            "tags": {},
            "status": statuses[i % 3],
            "attempt": 1,
            "max_attempts": 3,
            "created_at": now,
            "started_at": now,
            "finished_at": now + timedelta(seconds=i % 90),
            "progress_done": i % 90,
            "progress_total": 90,
            "progress_message": "",
            "seed": 0,
            "priority": 0,
            "log_bytes": 0,
        }
        for i in range(n)
    ]
    with session_scope(f"sqlite:///{server.home / 'crucible.db'}") as s:
        s.execute(insert(Job), rows)
