"""The FastAPI application: routes, error handlers, and the job waiter's lifetime."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import swagger_ui_bundle
from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api import errors
from api.console import routes as console
from api.input_guard import guard_input
from api.middleware import DefaultJSONContentType, RequestContext, security_headers
from api.routes import (
    admin,
    batches,
    edits,
    events,
    files,
    image_files,
    images,
    jobs,
    metrics,
    models,
    usage,
    weave,
    webhooks,
)
from api.upload_limit import UploadLimit
from api.waiter import JobWaiter
from shared.core import context
from shared.core.health import PROBES, Readiness, readiness
from shared.core.settings import get_settings
from shared.projects.limits import get_limiter
from shared.registry import get_registry


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Per-process resources, made once before requests run in the threadpool
    # (lazily, concurrent first requests would each build their own), and kept on
    # app.state for the routes' dependencies (api/deps.py).
    app.state.context = context.current()
    get_registry()
    get_limiter()
    waiter = JobWaiter(get_settings().redis_url)
    app.state.waiter = waiter
    await waiter.start()
    try:
        yield
    finally:
        await waiter.stop()


def create_app() -> FastAPI:
    app = FastAPI(
        title="imagegen",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(guard_input)],
        description="Image generation with an OpenAI-compatible API, as a job queue.",
        # Served below from a package, not a CDN: /docs works offline.
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app)
    _offline_docs(app)
    console.install(app)
    app.add_middleware(DefaultJSONContentType)
    app.add_middleware(UploadLimit)
    # Outermost: every line of the request carries its id; every answer the headers.
    app.add_middleware(RequestContext, headers=security_headers(get_settings()))
    app.include_router(images.router)
    app.include_router(edits.router)
    app.include_router(events.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(models.router)
    app.include_router(image_files.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(weave.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        await run_in_threadpool(PROBES["database"])
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: checks say why"}},
    )
    async def readyz() -> Readiness | JSONResponse:
        """Readiness: the database, the broker and storage each answer (503 naming
        the ones that do not, and why), so a balancer sends work only where it can
        be done. ``/healthz`` stays the cheap liveness check."""
        checks = await run_in_threadpool(readiness)
        ready = all(v == "ok" for v in checks.values())
        body = Readiness(status="ready" if ready else "not ready", checks=checks)
        return body if ready else JSONResponse(body.model_dump(), status_code=503)

    return app


# FastAPI's get_swagger_ui_html starts Swagger UI from an inline script, which the
# Content-Security-Policy (api/middleware.py) refuses: the page here loads the same
# bundle and starts it from a file of ours (the console's static files).
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imagegen API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" href="/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/console/static/docs.js" data-openapi-url="{openapi_url}"></script>
</body>
</html>
"""


def _offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its assets from the swagger-ui-bundle package."""
    app.mount(
        "/docs/assets",
        StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
        name="docs-assets",
    )
    page = DOCS_PAGE.replace("{openapi_url}", html.escape(app.openapi_url or "/openapi.json"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)
