"""ASGI middleware."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import WEAVE_PREFIXES


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
