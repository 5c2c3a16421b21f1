"""ASGI middleware."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import WEAVE_PREFIXES
from shared.core.ids import new_id
from shared.core.instruments import HTTP_SECONDS
from shared.core.logs import bind
from shared.core.settings import Settings

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


def security_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries, for the console (``/``) and the docs
    (``/docs``) above all: scripts, styles, fonts and requests only from this
    origin and never inline (both pages load theirs from files we serve); images
    also as data: URIs and from storage's origin (the console shows presigned S3
    URLs); no framing; no sniffing; no Referer leaving with a URL. HSTS is the TLS
    proxy's to add (README): over plain HTTP it means nothing."""
    images = ["'self'", "data:", *_storage_origins(settings)]
    policy = "; ".join(
        [
            "default-src 'self'",
            f"img-src {' '.join(images)}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


def _storage_origins(settings: Settings) -> list[str]:
    """Where the console's images live besides this origin: S3's public endpoint
    (what presigned URLs name), AWS's S3 hosts when no endpoint is set, and the
    public URL local-storage links are made with, when set."""
    origins: list[str] = []
    if settings.s3_bucket:
        endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        origins.append(_origin(endpoint) if endpoint else "https://*.amazonaws.com")
    if settings.public_url:
        origins.append(_origin(settings.public_url))
    return [o for o in dict.fromkeys(origins) if o]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class RequestContext:
    """What every request gets, in one pass around it (one wrapper of ``send`` on the
    hot path, not one per concern):

    - an id: the caller's ``X-Request-Id`` when it is a sane one (at most 64 of
      ``A-Za-z0-9._-``), else a new one. It is bound to every log line written for
      the request, answered in ``X-Request-Id``, and recorded on a job the request
      creates (so a job's worker lines carry it too);
    - its duration, observed by route template (``/v1/images/jobs/{job_id}``, never
      the path itself: ids would make a series each), method and status;
    - the security headers (``security_headers``), made once, appended to each
      answer's own.
    """

    def __init__(self, app: ASGIApp, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.app = app
        self.headers = list(headers)

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
                headers = [
                    *message.get("headers", []),
                    *self.headers,
                    (b"x-request-id", request_id.encode()),
                ]
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
