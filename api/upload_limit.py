"""Uploads are counted as they arrive and stopped at the limit.

A declared ``Content-Length`` over the limit is refused before a byte is read; an
undeclared (chunked) body is refused as soon as the bytes received pass it. Either
way the API never holds or spools more than the limit (a 210 MB upload raised the
API's RSS by up to 176 MiB before this), and the client gets 413 in OpenAI's shape.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from shared.core.errors import ErrorCode, InvalidRequest
from shared.files.service import MAX_FILE_BYTES

# Room for the multipart envelope around the file (boundaries, the purpose field).
ENVELOPE_BYTES = 64 * 1024
UPLOAD_PATHS = ("/v1/files",)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"The upload is larger than the limit of {limit} bytes.")


class UploadLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_FILE_BYTES + ENVELOPE_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") not in UPLOAD_PATHS
        ):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _refuse(scope, receive, send, self.limit)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside the form parser; FastAPI passes HTTPException on
                    # and the error handlers render it in the surface's shape.
                    raise _too_large(self.limit)
            return message

        await self.app(scope, counted, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    response = error_response(
        InvalidRequest(
            str(_too_large(limit).detail), param="file", code=ErrorCode.file_too_large, status=413
        )
    )
    response.headers["connection"] = "close"  # the unread body is not drained
    await response(scope, receive, send)
