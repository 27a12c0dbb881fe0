"""Compare: the x-axis title and the legend below the chart never overlap, however many jobs the legend names."""

from __future__ import annotations

import pytest

from tests.e2e.test_server import Server

pytest.importorskip("playwright", reason="the Python playwright package is missing (pip install -e '.[test]')")
from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.e2e


def overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


@pytest.mark.parametrize("jobs", [2, 5])
def test_the_axis_title_and_the_legend_do_not_overlap(page: Page, dash_server: Server, jobs: int):
    # test-sleep registers no model: the session's other tests count the models test-counter registers
    ids = [dash_server.submit(method="test-sleep", params={"steps": 3 + i, "step_seconds": 0.0}) for i in range(jobs)]
    for job_id in ids:
        dash_server.wait_status(job_id, ("succeeded",), timeout=120)
    page.goto(f"/#/compare?jobs={','.join(ids)}")
    chart = page.locator(".chart").first
    expect(chart.locator(".legend .traces")).to_have_count(jobs)
    title = chart.locator(".xtitle").bounding_box()
    legend = chart.locator(".legend").bounding_box()
    ticks = chart.locator(".xtick").first.bounding_box()
    assert title and legend and ticks
    assert not overlap(title, legend), (title, legend)
    assert not overlap(ticks, legend), (ticks, legend)
    box = chart.bounding_box()
    assert box and legend["y"] + legend["height"] <= box["y"] + box["height"] + 1  # inside its panel
