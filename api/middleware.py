"""ASGI middleware."""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import WEAVE_PREFIXES
from shared.core.ids import new_id
from shared.core.instruments import HTTP_SECONDS
from shared.core.logs import bind

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


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


class RequestContext:
    """What every request gets, in one pass around it (one wrapper of ``send`` on the
    hot path, not one per concern):

    - an id: the caller's ``X-Request-Id`` when it is a sane one (at most 64 of
      ``A-Za-z0-9._-``), else a new one. It is bound to every log line written for
      the request, answered in ``X-Request-Id``, and recorded on a job the request
      creates (so a job's worker lines carry it too);
    - its duration, observed by route template (``/v1/images/jobs/{job_id}``, never
      the path itself: ids would make a series each), method and status.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else new_id("req")
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            with bind(request_id=request_id):
                await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_SECONDS.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )
