"""The FastAPI app factory: settings → store, database, executor → routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from api import problems
from api.auth import SESSION_COOKIE, RateLimiter, auth_failed, authenticate, lookup_key
from api.guard import RequestGuard, cross_site
from api.offload import BlockingPool
from api.openapi import build_openapi
from api.routes import access, datasets, deployments, health, jobs, methods, models, openai_compat, uploads
from serving.manager import DeploymentManager
from workers.db import secure_state
from workers.executors import make_executor
from workers.executors.local import ExecutorLockedError
from workers.settings import Settings, load_plugins
from workers.storage import open_store

log = logging.getLogger("crucible.api")
VERSION = "0.1.0"


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
            app.state.blocking.shutdown()

    app = FastAPI(
        title="Crucible",
        version=VERSION,
        lifespan=lifespan,
        description="Submit ML research methods as jobs; track metrics, checkpoints and artifacts.",
        docs_url=None,  # served below from a package's copy of Swagger UI and ReDoc: no CDN, works offline
        redoc_url=None,
    )
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    app.state.settings = settings
    secure_state(settings.home, settings.database_url)  # state and caches readable by this user only
    app.state.store = open_store(settings.storage_url, settings.s3_endpoint, settings.s3_region)
    app.state.rate_limiter = RateLimiter()
    app.state.deployments = DeploymentManager(settings.serving_memory_bytes)  # warm models of this process
    app.state.blocking = BlockingPool(settings.blocking_workers, settings.blocking_queue)
    problems.install(app)
    app.add_middleware(RequestGuard, settings=settings)  # request ids; body caps counted as bytes arrive

    app.include_router(health.router)  # liveness stays open; /metrics authenticates itself
    for module in (methods, datasets, jobs, models, uploads, access, deployments, openai_compat):
        app.include_router(module.router, dependencies=[Depends(authenticate)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request, token: str | None = None) -> Response:
        """The dashboard. `/?token=<key>` (the link `crucible up` prints) logs the browser in once: the key
        moves into an HttpOnly, SameSite=Strict cookie and the redirect takes it out of the address bar."""
        if token is not None:
            return _login(request, token)
        return HTMLResponse(resources.files("api").joinpath("dashboard/index.html").read_text(encoding="utf-8"))

    @app.post("/login", include_in_schema=False)
    def login_form(request: Request, key: str = Form(...)) -> Response:
        return _login(request, key)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        _same_site_only(request, "log out")
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def _same_site_only(request: Request, what: str) -> None:
        """Login CSRF: another site's form or link must not log a browser in (into the attacker's project)
        or out; browsers say where a request came from (Sec-Fetch-Site, Origin), scripts send neither."""
        if cross_site(request.headers, str(request.base_url)):
            raise problems.Problem(
                403,
                "csrf",
                "Cross-site request refused",
                f"a request from another site may not {what}; open the login link yourself "
                "(paste it into the address bar) or use the form on this server's own page",
            )

    def _login(request: Request, key: str) -> Response:
        from workers.db import session_scope

        _same_site_only(request, "log this browser in")
        with session_scope(settings.database_url) as s:
            valid = lookup_key(s, key.strip()) is not None
        if not valid:
            failure = auth_failed(request, settings)
            if failure.status == 429:
                raise failure
        response = RedirectResponse("/" if valid else "/?login=failed", status_code=303)
        if valid:
            response.set_cookie(
                SESSION_COOKIE,
                key.strip(),
                httponly=True,
                samesite="strict",
                path="/",
                secure=request.url.scheme == "https",
                max_age=30 * 24 * 3600,
            )
        return response

    @app.api_route("/vendor/plotly.min.js", methods=["GET", "HEAD"], include_in_schema=False)
    def plotly_js() -> Response:
        return FileResponse(
            plotly_bundle(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    install_docs(app)
    app.mount("/dashboard", StaticFiles(directory=str(resources.files("api").joinpath("dashboard"))), name="dashboard")
    return app


DOCS_ASSETS = "/docs-assets"


def docs_assets() -> Path:
    """Swagger UI's and ReDoc's bundles as the `fastapi-offline` wheel ships them (as plotly.js comes from
    the `plotly` wheel): /docs and /redoc load nothing from the internet."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc on local assets; like /openapi.json they need no key."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html

    assert app.openapi_url is not None and app.swagger_ui_oauth2_redirect_url is not None
    openapi_url, redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(docs_assets())), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},  # no validator badge fetch
        )

    @app.get(redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def plotly_bundle() -> Path:
    """plotly.js as shipped inside the `plotly` wheel: the dashboard's charts, served locally (no CDN)."""
    try:
        import plotly
    except ImportError:
        raise problems.Problem(
            404,
            "plotly-missing",
            "Charting library not installed",
            "install the `plotly` package (pip install plotly) to draw charts",
        ) from None
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
