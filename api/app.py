"""The FastAPI app factory: settings → store, database, executor → routes."""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from api import problems
from api.routes import datasets, health, jobs, methods, models
from workers.executors import make_executor
from workers.executors.local import ExecutorLockedError
from workers.settings import Settings, load_plugins
from workers.storage import open_store

log = logging.getLogger("crucible.api")
VERSION = "0.1.0"
UPLOAD_PATHS = ("/api/v1/datasets",)


def create_app(settings: Settings | None = None, *, run_executor: bool = True) -> FastAPI:
    settings = settings or Settings()
    load_plugins(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.executor = None
        if run_executor:
            executor = make_executor(settings)
            try:
                executor.start()
                app.state.executor = executor
            except ExecutorLockedError as exc:
                log.warning("%s; serving the API without an executor", exc)
        try:
            yield
        finally:
            if app.state.executor is not None:
                app.state.executor.stop()

    app = FastAPI(title="Crucible", version=VERSION, lifespan=lifespan,
                  description="Submit ML research methods as jobs; track metrics, checkpoints and artifacts.")
    app.state.settings = settings
    app.state.store = open_store(settings.storage_url, settings.s3_endpoint, settings.s3_region)
    problems.install(app)

    @app.middleware("http")
    async def request_id_and_body_cap(request: Request, call_next):  # type: ignore[no-untyped-def]
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        cap = settings.max_upload_bytes if request.url.path.startswith(UPLOAD_PATHS) else settings.max_json_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            return problems.problem_response(request, problems.Problem(
                413, "body-too-large", "Request body too large",
                f"the body is {length} bytes; the limit for {request.url.path} is {cap} bytes"))
        response: Response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    for module in (health, methods, datasets, jobs, models):
        app.include_router(module.router)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return resources.files("api").joinpath("dashboard/index.html").read_text(encoding="utf-8")

    @app.api_route("/vendor/plotly.min.js", methods=["GET", "HEAD"], include_in_schema=False)
    def plotly_js() -> Response:
        return FileResponse(plotly_bundle(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    app.mount("/dashboard", StaticFiles(directory=str(resources.files("api").joinpath("dashboard"))),
              name="dashboard")
    return app


def plotly_bundle() -> Path:
    """plotly.js as shipped inside the `plotly` wheel: the dashboard's charts, served locally (no CDN)."""
    try:
        import plotly
    except ImportError:
        raise problems.Problem(404, "plotly-missing", "Charting library not installed",
                               "install the `plotly` package (pip install plotly) to draw charts") from None
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
