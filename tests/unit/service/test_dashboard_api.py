"""What the dashboard needs from the API beyond the CLI: search and filters on the job list, only
new metric points while polling, and its own files (plotly.js from the wheel, no CDN) served."""

from __future__ import annotations

from sqlalchemy import insert

from workers.db import session_scope
from workers.tables import Metric


def submit(api, **spec) -> str:
    r = api.post("/api/v1/jobs", json={"method": "test-counter", **spec})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ids(api, **params) -> list[str]:
    r = api.get("/api/v1/jobs", params=params)
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["items"]]


def test_job_list_filters_by_dataset_mode_and_search(api):
    plain = submit(api)
    on_digits = submit(api, dataset="digits")
    repro = submit(api, mode="reproduce", params={"smoke": True})
    assert ids(api, dataset="digits") == [on_digits]
    assert ids(api, mode="reproduce") == [repro]
    assert ids(api, mode="run") == [on_digits, plain]
    assert ids(api, q="DIGI") == [on_digits]  # case-insensitive, in method, dataset and id
    assert ids(api, q=plain[-8:].lower()) == [plain]
    assert set(ids(api, q="counter")) == {plain, on_digits, repro}
    assert ids(api, q="counter", limit=1, cursor=repro) == [on_digits]
    assert api.get("/api/v1/jobs", params={"mode": "bogus"}).status_code == 422


def test_metrics_since_step_returns_only_later_points(api, settings):
    job_id = submit(api)
    with session_scope(settings.database_url) as s:
        s.execute(
            insert(Metric),
            [
                {"job_id": job_id, "name": name, "step": step, "value": float(step), "time": 0.0}
                for name in ("loss", "acc")
                for step in range(1, 11)
            ],
        )
    url = f"/api/v1/jobs/{job_id}/metrics"
    everything = api.get(url).json()
    assert len(everything["items"]) == 20
    newer = api.get(url, params={"since_step": 7}).json()
    assert sorted((p["name"], p["step"]) for p in newer["items"]) == [
        ("acc", 8),
        ("acc", 9),
        ("acc", 10),
        ("loss", 8),
        ("loss", 9),
        ("loss", 10),
    ]
    assert api.get(url, params={"since_step": 10}).json()["items"] == []
    assert [p["step"] for p in api.get(url, params={"since_step": 8, "name": "acc"}).json()["items"]] == [9, 10]


def test_dashboard_and_its_chart_library_are_served_locally(api):
    page = api.get("/")
    assert page.status_code == 200 and '<script type="module" src="/dashboard/app.js">' in page.text
    app_js = api.get("/dashboard/app.js")
    assert app_js.status_code == 200 and "javascript" in app_js.headers["content-type"]
    plotly = api.get("/vendor/plotly.min.js")
    assert plotly.status_code == 200 and "javascript" in plotly.headers["content-type"]
    assert "max-age" in plotly.headers["cache-control"] and len(plotly.content) > 1_000_000
    assert "cdn." not in page.text and "https://" not in app_js.text
