"""One handler per error family, each rendering OpenAI's error shape.

FastAPI's default 422 never reaches the OpenAI surface: schema errors answer 400
naming the offending ``param``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from shared.core.errors import (
    ClientError,
    ErrorCode,
    ErrorResponse,
    ImagegenError,
    InternalError,
    InvalidValue,
    ServiceUnavailable,
    StorageUnavailable,
    UpstreamError,
    render,
    schema_error,
)

log = logging.getLogger(__name__)


WEAVE_PREFIXES = ("/image/", "/call/", "/calls/")

# The error answers every route of the OpenAI surface declares in the OpenAPI
# document. "4XX" covers the rest (403, 413, ...) and also stops FastAPI from
# documenting its default 422, which this surface never answers.
_ANSWERS: list[tuple[int | str, str]] = [
    (400, "Invalid request: `error.param` names the field"),
    (401, "Missing or invalid API key"),
    (404, "Not found: the model, job, batch, file, endpoint or path"),
    (409, "Conflict: an Idempotency-Key reused with another body, a finished job"),
    (429, "Rate limited or over a quota: see Retry-After"),
    ("4XX", "Any other client error (403 forbidden, 413 too large), same shape"),
    (500, "Server error"),
    (502, "Upstream error"),
    (503, "Service unavailable (database, broker or storage down): see Retry-After"),
    (504, "Upstream timed out"),
]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in _ANSWERS
}


def is_weave(request: Request) -> bool:
    """The Weave surface answers in FastAPI's own shapes (``detail``, 422)."""
    return request.url.path.startswith(WEAVE_PREFIXES)


def weave_error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def weave_validation_error(param: str | None, message: str) -> JSONResponse:
    """Weave's ``HTTPValidationError``, as its reference server answers a bad field."""
    loc = ["body", *(param.split(".") if param else [])]
    return JSONResponse(
        {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=422
    )


def _retry_after(err: ImagegenError) -> float | None:
    """Seconds to wait before trying again: the error's own, or 5 for any 429/503."""
    if err.retry_after is None and err.status_code in (429, 503):
        return 5.0
    return err.retry_after


def error_response(err: ImagegenError) -> JSONResponse:
    """OpenAI's error shape, from the one renderer (``shared.core.errors.render``)."""
    retry = _retry_after(err)
    headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else {}
    if err.should_retry is False:  # the openai package retries a 429 unless told not to
        headers["x-should-retry"] = "false"
    return JSONResponse(
        {"error": render(err).model_dump()}, status_code=err.status_code, headers=headers
    )


def _respond(request: Request, err: ImagegenError) -> JSONResponse:
    """The error in the surface's shape: OpenAI's, or the Weave server's ``detail``."""
    if not is_weave(request):
        return error_response(err)
    if isinstance(err, InvalidValue):
        return weave_validation_error(err.param, err.message)
    return weave_error(err.status_code, render(err).message, _retry_after(err))


def scope_error(scope: Scope, err: ImagegenError) -> JSONResponse:
    """``_respond`` for an ASGI middleware, which has a scope and no request yet."""
    return _respond(Request(scope), err)


async def _imagegen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImagegenError)
    if isinstance(exc, InternalError):
        # An internal condition no route turned into a client error: a 5xx whose
        # message names nothing internal.
        log.error("internal error reached the API: %s", type(exc).__name__)
        exc = UpstreamError(
            "The server had an error while processing your request.",
            code=ErrorCode.internal_error,
            status=500,
        )
    return _respond(request, exc)


def _client_error(
    status: int, message: str, code: str | None, param: str | None = None
) -> ClientError:
    err = ClientError(message, param=param, code=code, status=status)
    err.error_type = "invalid_request_error" if status < 500 else "server_error"
    return err


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's schema errors: 400 naming the ``param`` (the Weave surface keeps
    FastAPI's own 422)."""
    assert isinstance(exc, RequestValidationError)
    if is_weave(request):
        return await request_validation_exception_handler(request, exc)
    errors = exc.errors()
    return error_response(schema_error(errors[0] if errors else {}))


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first
    matching route's in ``Allow``; RFC 9110 wants them all)."""
    methods: set[str] = set()
    for route in request.app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


class BodyTooLarge(StarletteHTTPException):
    """413 raised while a body is read (api/upload_limit.py): an HTTPException, since
    FastAPI's form parsing turns any other exception into a 400."""

    def __init__(self, limit: int, code: str) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes.")
        self.code = code


class SlowBody(StarletteHTTPException):
    """408: a piece of the body did not arrive within the client timeout."""

    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"The request body did not arrive within {seconds:g} seconds.")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": _allowed_methods(request)}
    code = {
        404: ErrorCode.not_found,
        405: ErrorCode.method_not_allowed,
        408: getattr(exc, "code", None),
        413: getattr(exc, "code", ErrorCode.file_too_large),
    }.get(exc.status_code)
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":  # no route: name the path
        message = f"Invalid URL ({request.method} {request.url.path})"
    response = _respond(request, _client_error(exc.status_code, message, code))
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


def _unavailable(what: str) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """503 with Retry-After while a dependency (the database, storage) is out; the
    log names the fault's type only (a driver's message may carry a DSN)."""
    message = f"{what} is unavailable; try again shortly."

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s unavailable: %s", what.lower(), type(exc).__name__)
        return _respond(request, ServiceUnavailable(message, retry_after=5))

    return handler


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    """The backstop for a value the database refused (out of range, too long, a
    character it cannot hold) that validation at the edge let through: the client's
    fault, 400, never a 5xx a client would retry forever. The driver's message is
    not echoed (it can quote the value)."""
    log.warning("database refused a value: %s", type(getattr(exc, "orig", exc)).__name__)
    return _respond(
        request, InvalidValue("A value in the request is out of range or cannot be stored.")
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    if is_weave(request):
        return weave_error(500, "Internal server error")
    return error_response(
        UpstreamError(
            "The server had an error while processing your request.",
            code=ErrorCode.internal_error,
            status=500,
        )
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(ImagegenError, _imagegen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sqlalchemy.exc.DataError, _data_error)
    database_down = _unavailable("The database")
    app.add_exception_handler(sqlalchemy.exc.OperationalError, database_down)
    app.add_exception_handler(sqlalchemy.exc.InterfaceError, database_down)
    app.add_exception_handler(StorageUnavailable, _unavailable("Storage"))
    app.add_exception_handler(Exception, _unhandled)
