"""Request bodies are counted as they arrive and stopped at their route's limit.

A request that offers no key, or a key that is not valid, is answered 401 before
its body is read (a valid key is then cached, so the route's own check costs
nothing more). A
declared ``Content-Length`` over the limit is refused before a byte is read, and
so before the key is checked; an undeclared (chunked) body is refused as soon as
the bytes received pass it. Either way the API never holds or spools more
than the limit (a 210 MB upload raised the API's RSS by up to 176 MiB before this,
and a 300 MiB JSON body without a key 906 MiB), and the client gets 413 in the
surface's shape.

The limits: uploads to ``/v1/files`` as OpenAI's batch input (200 MiB); an edit
its images and mask at ``IMAGEGEN_EDIT_MAX_IMAGE_BYTES`` each; a variation one
image; a native batch, whose JSON carries its lines, 64 MiB; every other body
(JSON) ``IMAGEGEN_MAX_BODY_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import (
    key_from_request,
    known_key,
    missing_key,
    require_admin,
    wrong_key,
)
from api.errors import WEAVE_PREFIXES, BodyTooLarge, SlowBody, scope_error
from shared.core.errors import ClientError, ErrorCode, InvalidRequest
from shared.core.settings import Settings, get_settings
from shared.files.service import MAX_FILE_BYTES

# Room for the multipart envelope around the files (boundaries, the text fields).
ENVELOPE_BYTES = 64 * 1024
# 50,000 lines (the most a batch has) of a kilobyte and more each.
NATIVE_BATCH_BYTES = 64 * 1024 * 1024
UPLOAD_PATHS = ("/v1/files", "/v1/images/edits", "/v1/images/variations")
BODY_METHODS = ("POST", "PUT", "PATCH")

log = logging.getLogger(__name__)


def body_limit(path: str, settings: Settings) -> int:
    """The most bytes a request body to ``path`` may have."""
    path = path.rstrip("/")
    if path == "/v1/files":
        return MAX_FILE_BYTES + ENVELOPE_BYTES
    if path == "/v1/images/edits":
        # The images and a mask.
        return settings.edit_max_image_bytes * (settings.edit_max_images + 1) + ENVELOPE_BYTES
    if path == "/v1/images/variations":
        return settings.edit_max_image_bytes + ENVELOPE_BYTES
    if path == "/v1/images/batches":
        return NATIVE_BATCH_BYTES
    return settings.max_body_bytes


def _keyed_surface(path: str) -> bool:
    return path.startswith(("/v1/", *WEAVE_PREFIXES))


def _code(path: str) -> str:
    return ErrorCode.file_too_large if path.rstrip("/") in UPLOAD_PATHS else "request_too_large"


async def valid_key(key: str) -> bool:
    """Whether ``key`` is a valid key (cached, or looked up and then cached)."""
    known, _ = await known_key(key)
    return known is not None


class UploadLimit:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings | None = None,
        is_valid_key: Callable[[str], Awaitable[bool]] = valid_key,
    ) -> None:
        self.app = app
        self.settings = settings
        self.is_valid_key = is_valid_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if _keyed_surface(scope["path"]):
            # Every body-taking route there needs a valid key: without one, 401
            # before a byte of the body is read.
            refusal = await self._key_refusal(scope)
            if refusal is not None:
                response = scope_error(scope, refusal)
                response.headers["connection"] = "close"  # the unread body is not drained
                await response(scope, receive, send)
                return
        settings = self.settings or get_settings()
        limit = body_limit(scope["path"], settings)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _refuse(scope, receive, send, limit)
                return
        received = 0
        body_done = False

        async def counted() -> Message:
            nonlocal received, body_done
            if body_done:  # a streamed answer listening for the client to leave
                return await receive()
            try:
                # Each piece of the body within the client timeout (api/slow_clients.py).
                async with asyncio.timeout(settings.client_timeout_seconds):
                    message = await receive()
            except TimeoutError:
                raise SlowBody(settings.client_timeout_seconds) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the body or form parser; FastAPI passes
                    # HTTPException on and the error handlers render it in the
                    # surface's shape.
                    raise BodyTooLarge(limit, _code(scope["path"]))
            return message

        await self.app(scope, counted, send)

    async def _key_refusal(self, scope: Scope) -> ClientError | None:
        """Why the request's key is refused, or None to go on. A lookup that fails (the
        database down) goes on too: the route's own check answers in its own way."""
        if scope["path"].startswith("/v1/admin/"):
            try:
                require_admin(Request(scope))
            except ClientError as exc:
                return exc
            return None
        key = key_from_request(Request(scope))
        if not key:
            return missing_key()
        try:
            valid = await self.is_valid_key(key)
        except Exception:
            log.debug("key lookup before the body failed; the route checks again", exc_info=True)
            return None
        return None if valid else wrong_key(key)


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    code = _code(scope["path"])
    response = scope_error(
        scope,
        InvalidRequest(
            str(BodyTooLarge(limit, code).detail),
            param="file" if code == ErrorCode.file_too_large else None,
            code=code,
            status=413,
        ),
    )
    response.headers["connection"] = "close"  # the unread body is not drained
    await response(scope, receive, send)
