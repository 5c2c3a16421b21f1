"""The error tree. Each error carries its HTTP status and renders in the surface's shape."""

from __future__ import annotations


class ImagegenError(Exception):
    """Base: an error a client should see, with its status and OpenAI error fields."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class InvalidRequest(ImagegenError):
    """The request is malformed or breaks the model's capabilities (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidValue(InvalidRequest):
    """A field's value is out of what the service can hold (a NUL, a lone surrogate, a
    number or length out of range): 400 on the OpenAI surface, and the Weave
    surface's own 422 ``HTTPValidationError`` naming the field."""

    code = "invalid_value"


class AuthenticationError(ImagegenError):
    """Missing, unknown or revoked API key (401)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ImagegenError):
    """The object does not exist in the caller's project (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """The model is not in the registry (404 ``model_not_found``)."""

    code = "model_not_found"


class Forbidden(ImagegenError):
    """A wrong or expired file signature (403)."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class RateLimited(ImagegenError):
    """Too many requests; always carries ``retry_after`` (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(ImagegenError):
    """A dependency the request needs is down (503)."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class UpstreamError(ImagegenError):
    """The provider failed after retries (502) or timed out (504)."""

    status_code = 502
    error_type = "server_error"
    code = "upstream_error"


class Conflict(ImagegenError):
    """The object is in a state that does not allow the operation (409)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"
