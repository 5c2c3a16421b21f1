"""The error tree: one root, two branches, one list of codes, one renderer.

- ``ClientError``: the request cannot be served as asked. Carries its HTTP status
  and OpenAI ``type``; raised by services and rendered by the API as is.
- ``InternalError``: a condition inside the service (a provider failed, storage is
  out, an image is unreadable, a job was canceled under a worker). The worker
  decides what each means for a job; should one reach the API it answers 5xx.

Every error has a ``code``: one of ``ErrorCode``, or (for a provider's own refusal)
the code the upstream gave, passed through as OpenAI's clients expect it.
``render`` turns any error into OpenAI's error object; API answers, failed jobs,
batch output lines and the Weave surface's ``detail`` all come from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from shared.core.schemas import Schema


class ErrorCode(StrEnum):
    # The request
    invalid_request = "invalid_request"
    invalid_value = "invalid_value"
    invalid_json = "invalid_json"
    missing_required_parameter = "missing_required_parameter"
    string_above_max_length = "string_above_max_length"
    file_too_large = "file_too_large"
    method_not_allowed = "method_not_allowed"
    # Who is asking, and for what
    invalid_api_key = "invalid_api_key"
    missing_api_key = "missing_api_key"
    forbidden = "forbidden"
    not_found = "not_found"
    model_not_found = "model_not_found"
    conflict = "conflict"
    idempotency_key_reused = "idempotency_key_reused"
    # An image past its life (retention or Image-Expires-After): deleted, 410 (issue 29).
    image_expired = "image_expired"
    # Limits
    rate_limit_exceeded = "rate_limit_exceeded"
    images_per_day_exceeded = "images_per_day_exceeded"
    jobs_in_flight_exceeded = "jobs_in_flight_exceeded"
    insufficient_quota = "insufficient_quota"
    # The project's stored bytes reached its storage_quota_bytes (issue 29).
    storage_quota_exceeded = "storage_quota_exceeded"
    # The service and its providers
    service_unavailable = "service_unavailable"
    internal_error = "internal_error"
    upstream_error = "upstream_error"
    upstream_timeout = "upstream_timeout"
    upstream_unavailable = "upstream_unavailable"
    upstream_rate_limited = "upstream_rate_limited"
    upstream_rejected = "upstream_rejected"
    upstream_auth_error = "upstream_auth_error"
    upstream_bad_response = "upstream_bad_response"
    provider_misconfigured = "provider_misconfigured"
    # Local models: the model's files cannot be loaded; the GPU ran out of memory.
    model_unavailable = "model_unavailable"
    out_of_memory = "out_of_memory"
    storage_unavailable = "storage_unavailable"
    unsafe_target = "unsafe_target"
    unresolvable_target = "unresolvable_target"
    # Jobs
    job_failed = "job_failed"
    job_canceled = "job_canceled"
    max_attempts_exceeded = "max_attempts_exceeded"
    # Not finished by its Cancel-After deadline: ended canceled, not charged.
    deadline_exceeded = "deadline_exceeded"
    # Batches and their lines
    batch_cancelled = "batch_cancelled"
    batch_expired = "batch_expired"
    invalid_file = "invalid_file"
    invalid_json_line = "invalid_json_line"
    invalid_method = "invalid_method"
    invalid_url = "invalid_url"
    invalid_body = "invalid_body"
    duplicate_custom_id = "duplicate_custom_id"
    too_many_lines = "too_many_lines"
    empty_file = "empty_file"


class ErrorBody(Schema):
    """OpenAI's error object."""

    message: str
    """What went wrong and, where there is one, the fix."""
    type: str
    """The family: ``invalid_request_error``, ``authentication_error``,
    ``rate_limit_error``, ``server_error``, ..."""
    param: str | None = None
    """The request field at fault (``size``, ``requests[3].prompt``), if any."""
    code: str | None = None
    """A stable code (``invalid_value``, ``model_not_found``, ``rate_limit_exceeded``,
    ``idempotency_key_reused``, ``upstream_timeout``, ...)."""


class ErrorResponse(Schema):
    """Every error answer of the OpenAI surface."""

    error: ErrorBody
    """The error."""


class ImagegenError(Exception):
    """The root of every error this service raises on purpose."""

    status_code = 500
    error_type = "server_error"
    code: str | None = ErrorCode.internal_error
    # False: the answer says so to OpenAI's clients (``x-should-retry: false``).
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        """``status`` overrides the class's HTTP status for this one error (a job's
        timeout answers 504, an oversize upload 413)."""
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status_code = status
        self.retry_after = retry_after


# The most of a client's bad value an error message quotes: a 1 MB `size` came back
# whole in a 1 MB 400 before.
QUOTE_CHARS = 64


def quoted(value: object) -> str:
    """A client's value for an error message: as given, cut to QUOTE_CHARS."""
    text = str(value)
    if len(text) <= QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def render(err: ImagegenError) -> ErrorBody:
    """The one rendering of an error, as OpenAI's error object."""
    return ErrorBody(
        message=err.message,
        type=err.error_type,
        param=err.param,
        code=None if err.code is None else str(err.code),
    )


# --- client errors: the request, as asked, cannot be served ---------------------------


class ClientError(ImagegenError):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None


class InvalidRequest(ClientError):
    """The request is malformed or breaks the model's capabilities (400)."""


class InvalidValue(InvalidRequest):
    """A field's value is out of what the service can hold (a NUL, a lone surrogate, a
    number or length out of range): 400 on the OpenAI surface, and the Weave
    surface's own 422 ``HTTPValidationError`` naming the field."""

    code = ErrorCode.invalid_value


class AuthenticationError(ClientError):
    """Missing, unknown or revoked API key (401)."""

    status_code = 401
    code = ErrorCode.invalid_api_key


class Forbidden(ClientError):
    """A wrong or expired file signature, or another project's resource (403)."""

    status_code = 403
    code = ErrorCode.forbidden


class NotFound(ClientError):
    """The object does not exist in the caller's project (404)."""

    status_code = 404
    code = ErrorCode.not_found


class ModelNotFound(NotFound):
    """The model is not in the registry (404 ``model_not_found``)."""

    code = ErrorCode.model_not_found


class Gone(ClientError):
    """The object existed and is past its life (410): an expired image's file."""

    status_code = 410
    code = ErrorCode.image_expired


class Conflict(ClientError):
    """The object is in a state that does not allow the operation (409)."""

    status_code = 409
    code = ErrorCode.conflict


class RateLimited(ClientError):
    """Too many requests; always carries ``retry_after`` (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = ErrorCode.rate_limit_exceeded


class InsufficientQuota(RateLimited):
    """The project's (or key's) budget cannot cover the request (429): OpenAI's own
    ``insufficient_quota``, whose ``type`` is the code itself. Trying again does
    not help before the budget's period ends (``retry_after``) or it is raised,
    so the answer tells OpenAI's clients not to retry (``should_retry``)."""

    error_type = "insufficient_quota"
    code = ErrorCode.insufficient_quota
    should_retry = False


class StorageQuotaExceeded(RateLimited):
    """The project keeps as many bytes as its ``storage_quota_bytes`` allows (429):
    new work (generations, edits, variations, batches, file uploads) is refused
    until it deletes or lets expire what it stores, or the quota is raised. The
    ``type`` is OpenAI's ``insufficient_quota`` (a quota, not a rate), the code our
    own; waiting alone does not help, so clients are told not to retry."""

    error_type = "insufficient_quota"
    code = ErrorCode.storage_quota_exceeded
    should_retry = False


class ServiceUnavailable(ClientError):
    """A dependency the request needs is down (503): try again later."""

    status_code = 503
    error_type = "server_error"
    code = ErrorCode.service_unavailable


class UpstreamError(ClientError):
    """How a job the provider failed answers a waiting request: 502, or 504 for a
    timeout, or 500 for our own fault (``status`` says)."""

    status_code = 502
    error_type = "server_error"
    code = ErrorCode.upstream_error


def schema_error(error: Mapping[str, Any]) -> InvalidRequest:
    """A schema error (pydantic's, the first of a request) as the request's 400,
    naming the offending ``param``: the one mapping for FastAPI's request
    validation and for bodies validated later (batch lines, Weave inputs)."""
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    kind = error.get("type")
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request.", code=ErrorCode.invalid_json
        )
    if kind == "missing":
        if param is None:
            return InvalidRequest(
                "The request body must be a JSON object.", code=ErrorCode.invalid_request
            )
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code=ErrorCode.missing_required_parameter,
        )
    msg = error.get("msg", "Invalid request")
    return InvalidValue(f"Invalid value for '{param}': {msg}." if param else str(msg), param=param)


# --- internal errors: conditions inside the service ----------------------------------


class InternalError(ImagegenError):
    """A condition inside the service; the worker decides what it means for a job."""


class ProviderError(InternalError):
    """A provider call failed."""

    code = ErrorCode.upstream_error


class TransientProviderError(ProviderError):
    """Worth retrying: timeouts, connection errors, 429, 5xx."""

    code = ErrorCode.upstream_unavailable


class PermanentProviderError(ProviderError):
    """Never retried: invalid request, content policy, bad credentials. Its code may be
    the upstream's own (``content_policy_violation``)."""

    code = ErrorCode.upstream_rejected


class UnreadableImage(InternalError):
    """The provider returned bytes that are not an image."""

    code = ErrorCode.upstream_bad_response


class StorageUnavailable(InternalError):
    """The store can't take the write now (unreachable, a server error, a full
    disk): the caller waits and tries again, it does not fail the work."""

    status_code = 503
    code = ErrorCode.storage_unavailable


class JobCanceled(InternalError):
    """The job was canceled (or taken over) while this attempt ran."""

    code = ErrorCode.job_canceled

    def __init__(self, message: str = "The job was canceled.") -> None:
        super().__init__(message)


class NoCapacity(InternalError):
    """Every deployment that could take the call is at its limit (issue 26): the
    job waits ``retry_after`` seconds in the queue, not holding a worker; no
    attempt is spent."""

    code = ErrorCode.upstream_rate_limited


class UpstreamPending(InternalError):
    """A queue provider's job is not done yet (issue 27): the job waits
    ``retry_after`` seconds queued, holding no worker, and then looks again; no
    attempt is spent."""

    code = ErrorCode.upstream_unavailable


class UnsafeTarget(InternalError):
    """A webhook URL that is not http(s) or points at a non-public address. At the
    edge it becomes the request's 400 (``shared.webhooks.service.check_url``); in
    the worker it ends the delivery."""

    code = ErrorCode.unsafe_target


class UnresolvableTarget(InternalError):
    """The webhook host does not resolve (now): worth another try later."""

    code = ErrorCode.unresolvable_target
