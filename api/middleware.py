"""ASGI middleware."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import WEAVE_PREFIXES
from shared.core.instruments import HTTP_SECONDS


class DefaultJSONContentType:
    """The weave client posts raw JSON sometimes without a Content-Type header; the
    reference server reads it as JSON, so a body on the Weave paths without one is
    taken as ``application/json``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith(WEAVE_PREFIXES)
            and not any(name == b"content-type" for name, _ in scope["headers"])
        ):
            scope = {
                **scope,
                "headers": [*scope["headers"], (b"content-type", b"application/json")],
            }
        await self.app(scope, receive, send)


class RequestMetrics:
    """Each request's duration by route template (``/v1/images/jobs/{job_id}``, never
    the path itself: ids would make a series each), method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_SECONDS.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )
