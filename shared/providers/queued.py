"""What the providers that are queues themselves (``replicate``, ``fal``) share.

Each holds one HTTP client per process, made and pooled as
``OpenAICompatibleProvider``'s (an instance of which on that client is its
``fetcher``). Answers are read with caps; image URLs are fetched by the fetcher's
``_download`` (the origin and SSRF checks), an inline ``data:`` URI decoded here,
as bounded. A call that finds the upstream unreachable or busy while *looking* at a
job it already submitted is not a failure of that job: the job is still there, so
the provider answers ``Pending`` (a failure would make the worker drop its record
and submit, and pay, again). ``wait_in_place`` is ``generate`` for such a provider:
submit, then look until done, within
``IMAGEGEN_PROVIDER_TIMEOUT_SECONDS``. ``file_fields`` puts an edit's or a
variation's files on the model's inputs the entry's ``file_inputs`` name.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from shared.core.errors import (
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from shared.core.settings import get_settings
from shared.providers.base import Call, Generation, Pending, mime_type
from shared.providers.openai_compat import (
    _TRANSIENT_STATUS,
    MAX_DOWNLOAD_BYTES,
    MAX_ERROR_BYTES,
    OpenAICompatibleProvider,
    _origin,
    _read_capped,
    _retry_after,
    _upstream_errors,
    _url,
)
from shared.providers.stability import stability_mask
from shared.registry import ModelSpec, UpstreamModel
from shared.registry.entries import FileInputs

# The most of an upstream's error text a job's error message keeps.
MAX_MESSAGE_CHARS = 500
# A job's JSON (its status, its result's image URLs, an inline data: URI or two).
MAX_JOB_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, its body read (capped)."""

    response: httpx.Response
    content: bytes

    @property
    def status(self) -> int:
        return self.response.status_code

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise TransientProviderError(
                f"upstream answered {self.status} with no JSON", code="upstream_bad_response"
            ) from exc


def exchange(
    client: httpx.Client,
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
    limit: int = MAX_JOB_BYTES,
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
) -> Answer:
    """One request (a JSON ``body``, or a multipart form of ``files``); its answer
    read up to ``limit`` (an error's up to MAX_ERROR_BYTES). Timeouts and connection
    failures are transient errors."""
    request: dict[str, Any] = {"headers": headers}
    if body is not None:
        request["json"] = body
    if files is not None:
        request["files"] = files
    with _upstream_errors(), client.stream(method, url, **request) as response:
        cap = MAX_ERROR_BYTES if response.status_code >= 400 else limit
        return Answer(response, _read_capped(response, cap, "answer"))


def refusal(answer: Answer, message: str, *, policy: bool = False) -> ProviderError:
    """An error answer as the provider error it means: a content filter's refusal,
    a transient status (429 with its Retry-After, 5xx), bad credentials, or the
    upstream's refusal of the request."""
    message = bounded(message)
    status = answer.status
    if policy:
        return PermanentProviderError(message, code="content_policy_violation")
    if status in _TRANSIENT_STATUS:
        return TransientProviderError(
            f"upstream answered {status}: {message}",
            code="upstream_rate_limited" if status == 429 else "upstream_unavailable",
            retry_after=_retry_after(answer.response),
        )
    if status in (401, 403):
        return PermanentProviderError(message, code="upstream_auth_error")
    return PermanentProviderError(message, code="upstream_rejected")


def unseen(exc: TransientProviderError, spec: UpstreamModel) -> Pending:
    """A look at a submitted job that did not reach it (a timeout, a 429, a 5xx):
    the job is still there, look again later."""
    after = max(spec.poll_seconds, exc.retry_after or 0.0)
    return Pending(after=after, status=f"not reached ({exc.code})")


def bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def base_url(spec: UpstreamModel, default: str) -> str:
    return (spec.base_url or default).rstrip("/")


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` is on ``base``'s origin: only there is our key sent."""
    try:
        return _origin(httpx.URL(url)) == _origin(httpx.URL(base))
    except (httpx.InvalidURL, TypeError):
        return False


def api_key(spec: UpstreamModel) -> str:
    key = spec.api_key()
    if not key:
        raise PermanentProviderError(
            f"model '{spec.name}': no API key in ${spec.api_key_env}"
            if spec.api_key_env
            else f"model '{spec.name}' names no api_key_env",
            code="provider_misconfigured",
        )
    return key


def fetch_image(fetcher: OpenAICompatibleProvider, url: Any, upstream: str) -> bytes:
    """An output image: an inline ``data:`` URI decoded, or a URL downloaded (into
    memory, with ``OpenAICompatibleProvider._download``'s checks)."""
    if not isinstance(url, str) or not url:
        raise PermanentProviderError(
            "the upstream's output is not an image URL", code="upstream_bad_response"
        )
    if url.startswith("data:"):
        return _data_uri(url)
    _url(url)  # not a URL: refused, as the download would
    return fetcher._download(url, upstream)


def _data_uri(url: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or len(payload) > MAX_DOWNLOAD_BYTES * 4 // 3 + 4:
        raise PermanentProviderError(
            "the upstream's data URI is malformed or too large", code="upstream_bad_response"
        )
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise PermanentProviderError(
            "the upstream's data URI is not valid base64", code="upstream_bad_response"
        ) from exc


def data_uri(data: bytes) -> str:
    """An input file inline, as both providers take one: ``data:<type>;base64,...``."""
    return f"data:{mime_type(data)};base64,{base64.b64encode(data).decode()}"


def file_fields(call: Call, names: FileInputs, file: Callable[[bytes], str]) -> dict[str, Any]:
    """An edit's or a variation's files as the model's inputs ``names`` names, each
    as ``file`` makes it (a data URI, an uploaded file's URL): the input image, or
    all of them where the model takes a list; the mask, white where to edit (ours
    marks it with transparent pixels; FLUX Fill and SDXL inpainting, on Replicate
    and fal, paint the white ones), for the first image. A file the model has no
    input for is refused, never dropped."""
    name, inputs = call.spec.name, call.inputs
    if inputs is None or not inputs.images:
        raise PermanentProviderError(
            "an edit or a variation needs an input image", code="invalid_value"
        )
    fields: dict[str, Any] = {}
    if names.images is not None:
        fields[names.images] = [file(data) for data in inputs.images]
    elif names.image is not None and len(inputs.images) == 1:
        fields[names.image] = file(inputs.images[0])
    else:
        raise PermanentProviderError(
            f"model '{name}' takes one input image, not {len(inputs.images)} (a model "
            "that takes a list names it as file_inputs.images)",
            code="invalid_value",
        )
    if inputs.mask is not None:
        if names.mask is None:
            raise PermanentProviderError(
                f"model '{name}' takes no mask (its file_inputs name no mask input)",
                code="invalid_value",
            )
        fields[names.mask] = file(stability_mask(inputs.mask))
    return fields


def wait_in_place(
    call: Call,
    submit: Callable[[], dict[str, Any]],
    poll: Callable[[Call, dict[str, Any]], Generation | Pending],
    cancel: Callable[[ModelSpec, dict[str, Any]], None],
) -> Generation:
    """Submit, then look until done, sleeping as each look says, for at most
    IMAGEGEN_PROVIDER_TIMEOUT_SECONDS; an upstream job given up on (the time out, a
    cancel raised meanwhile) is canceled there."""
    deadline = time.monotonic() + get_settings().provider_timeout_seconds
    ref = submit()
    try:
        answer = poll(call, ref)
        while isinstance(answer, Pending) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(answer.after, deadline - time.monotonic())))
            answer = poll(call, ref)
    except ProviderError:  # the upstream job failed: nothing to cancel
        raise
    except BaseException:  # canceled under us, or the process stopping
        cancel(call.spec, ref)
        raise
    if isinstance(answer, Generation):
        return answer
    cancel(call.spec, ref)
    raise TransientProviderError(
        f"the upstream job was still {answer.status} at the time limit", code="upstream_timeout"
    )
