"""``fal``: fal's queue API (https://docs.fal.ai/model-apis/model-endpoints/queue).

A request is submitted with ``POST {base_url}/{app_id}`` (``upstream_model``, such as
``fal-ai/flux/dev``), the key as ``Authorization: Key``; the answer's ``request_id``,
``status_url``, ``response_url`` and ``cancel_url`` are kept in the job's record.
Those URLs drop the app's subpath (``fal-ai/flux/requests/{id}``); they are used as
given when on ``base_url``'s origin, else built the same way (our key goes only to
``base_url``). The status (``GET .../requests/{id}/status``: ``IN_QUEUE`` with
``queue_position``, ``IN_PROGRESS``, ``COMPLETED``) is looked at until completed,
then the result (``GET .../requests/{id}``: ``images[]`` with ``url``,
``content_type``, ``width``, ``height``; ``seed``; ``has_nsfw_concepts``) is read
and its images downloaded into memory (``OpenAICompatibleProvider._download``'s
checks); cancel is ``PUT .../requests/{id}/cancel``.

The input: ``prompt``, ``image_size`` as ``{"width", "height"}``, ``num_images``,
``seed`` (the job's seed plus the call's first image index), ``output_format``
(``jpeg`` or ``png``) and ``enable_safety_checker: true`` always: an image the
checker flags (``has_nsfw_concepts``) is a refusal, ``content_policy_violation``,
never an image.

Edits and variations: the input image, and an edit's mask (white where to edit),
go inline as data URIs, which fal's file inputs take ("Models also accept
base64-encoded data URIs": https://docs.fal.ai/documentation/model-apis/fal-cdn;
its CDN upload is another host, which our key does not go to), on the app's inputs
the entry's ``file_inputs`` name (unset: FLUX Kontext's ``image_url``; FLUX Fill
takes ``image_url`` and ``mask_url``, an app taking a list such as
``fal-ai/nano-banana/edit`` ``image_urls``). A variation (FLUX Redux:
``fal-ai/flux/dev/redux``, ``image_url``) sends no prompt. The size is sent as for a
generation; a model listing ``auto`` sends none (the app's own default).

Errors (https://docs.fal.ai/model-apis/errors, .../request-errors): a model's
``{"detail": [{"loc", "msg", "type", ...}]}`` (422 validation; ``type``
``content_policy_violation`` a refusal), a request's ``{"detail": "...",
"error_type": ...}``; 401/403 bad credentials, 429 and 5xx transient, and
``X-Fal-Retryable`` honoured where it says otherwise.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from shared.core.context import current
from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import Call, GeneratedImage, Generation, Pending, entry_of
from shared.providers.openai_compat import OpenAICompatibleProvider
from shared.providers.queued import (
    Answer,
    api_key,
    base_url,
    bounded,
    data_uri,
    exchange,
    fetch_image,
    file_fields,
    refusal,
    same_origin,
    unseen,
    wait_in_place,
)
from shared.registry import ModelSpec, UpstreamModel, parse_size
from shared.registry.entries import FileInputs

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://queue.fal.run"
APP_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# App ids under these namespaces have three segments before their subpath.
NAMESPACES = ("workflows", "comfy")
PENDING = ("IN_QUEUE", "IN_PROGRESS")
URLS = {"status_url": "/status", "response_url": "", "cancel_url": "/cancel"}
# An edit's files, unless the entry names others: FLUX Kontext's input image.
DEFAULT_FILE_INPUTS = FileInputs(image="image_url")


class FalProvider:
    def __init__(self, fetcher: OpenAICompatibleProvider) -> None:
        self.fetcher = fetcher  # its client and its _download (the origin and SSRF checks)
        self.client = fetcher.client

    @classmethod
    def shared(cls) -> FalProvider:
        """The process's one instance: its own HTTP client, pooled as the openai
        provider's, shared by every worker thread."""
        return current().made("fal", lambda context: cls(OpenAICompatibleProvider._make(context)))

    # --- QueueProvider -------------------------------------------------------------

    def submit(self, call: Call) -> dict[str, Any]:
        spec = entry_of(call.spec, UpstreamModel)
        url = f"{base_url(spec, DEFAULT_BASE_URL)}/{_app_id(spec)}"
        body = fal_input(call.params, call.count, call.first_index)
        if call.params.operation != "generate":
            if call.params.operation == "variation":  # the image alone: no prompt
                del body["prompt"]
            body.update(file_fields(call, spec.file_inputs or DEFAULT_FILE_INPUTS, data_uri))
        answer = exchange(self.client, "POST", url, _headers(spec), body)
        if answer.status >= 400:
            raise _refused(answer)
        queued = answer.json()
        if not isinstance(queued, dict):
            raise TransientProviderError(
                "fal answered without a request", code="upstream_bad_response"
            )
        ref: dict[str, Any] = {"request_id": _request_id(queued)}
        ref.update({k: v for k, v in queued.items() if k in URLS and isinstance(v, str)})
        return ref

    def poll(self, call: Call, ref: dict[str, Any]) -> Generation | Pending:
        spec = entry_of(call.spec, UpstreamModel)
        try:
            answer = exchange(self.client, "GET", _url(spec, ref, "status_url"), _headers(spec))
        except TransientProviderError as exc:
            return unseen(exc, spec)
        if answer.status == 404:  # not (any more) under this key: submitted anew
            raise TransientProviderError("fal knows no such request", code="upstream_unavailable")
        if answer.status >= 400:
            error = _refused(answer)
            if isinstance(error, TransientProviderError):
                return unseen(error, spec)
            raise error
        state = answer.json()
        status = str(state.get("status")) if isinstance(state, dict) else "?"
        if status in PENDING:
            position = state.get("queue_position")
            where = f" (position {position})" if isinstance(position, int) else ""
            return Pending(after=spec.poll_seconds, status=status + where)
        return self._result(call, spec, ref)  # COMPLETED: its result, or its error

    def cancel(self, spec: ModelSpec, ref: dict[str, Any]) -> None:
        upstream = entry_of(spec, UpstreamModel)
        try:
            answer = exchange(
                self.client, "PUT", _url(upstream, ref, "cancel_url"), _headers(upstream)
            )
        except ProviderError as exc:
            log.warning("fal: cancel failed: %s", exc.message)
            return
        if answer.status >= 400 and answer.status not in (400, 404):  # done, or gone
            log.warning("fal: cancel answered %d", answer.status)

    # --- Provider ------------------------------------------------------------------

    def generate(self, call: Call) -> Generation:
        """Submit, then look until done."""
        return wait_in_place(call, lambda: self.submit(call), self.poll, self.cancel)

    # --- the result ----------------------------------------------------------------

    def _result(self, call: Call, spec: UpstreamModel, ref: dict[str, Any]) -> Generation | Pending:
        url = _url(spec, ref, "response_url")
        try:
            answer = exchange(self.client, "GET", url, _headers(spec))
        except TransientProviderError as exc:
            return unseen(exc, spec)
        if answer.status >= 400:
            error = _refused(answer)
            failed = "x-fal-error-type" in answer.response.headers or _error_type(answer)
            if isinstance(error, TransientProviderError) and not failed:
                return unseen(error, spec)  # fal busy, not the request failed
            raise error
        result = answer.json()
        if not isinstance(result, dict) or not isinstance(result.get("images"), list):
            raise TransientProviderError(
                "fal's result has no images list", code="upstream_bad_response"
            )
        images = result["images"]
        flags = result.get("has_nsfw_concepts")
        if isinstance(flags, list) and any(flag is True for flag in flags):
            raise PermanentProviderError(
                "fal: the safety checker flagged the image as NSFW",
                code="content_policy_violation",
            )
        if len(images) < call.count:
            raise PermanentProviderError(
                f"fal returned {len(images)} images for {call.count} asked (a model without "
                "num_images needs capabilities.upstream_max_n: 1)",
                code="upstream_bad_response",
            )
        before_answer()  # the images are read holding the job's answer slot
        return Generation(
            images=[
                GeneratedImage(fetch_image(self.fetcher, _image_url(item), url))
                for item in images[: call.count]
            ]
        )


def fal_input(params: GenerationParams, count: int, first_index: int) -> dict[str, Any]:
    """A request's input for images ``first_index`` .. of a job."""
    body: dict[str, Any] = {"prompt": params.prompt, "num_images": count}
    size = parse_size(params.size)
    if size is not None:
        body["image_size"] = {"width": size[0], "height": size[1]}
    if params.seed is not None:
        body["seed"] = params.seed + first_index
    body["output_format"] = "jpeg" if params.output_format == "jpeg" else "png"
    body["enable_safety_checker"] = True
    return body


def request_root(app_id: str) -> str:
    """The app's path without its subpath: where its requests are looked at."""
    parts = app_id.split("/")
    return "/".join(parts[:3] if parts[0] in NAMESPACES else parts[:2])


def _url(spec: UpstreamModel, ref: dict[str, Any], name: str) -> str:
    """One of the request's URLs: as fal gave it when on ``base_url``'s origin, else
    built from the app id."""
    base = base_url(spec, DEFAULT_BASE_URL)
    given = ref.get(name)
    if isinstance(given, str) and same_origin(given, base):
        return given
    root = request_root(_app_id(spec))
    return f"{base}/{root}/requests/{_request_id(ref)}{URLS[name]}"


def _app_id(spec: UpstreamModel) -> str:
    app = spec.upstream_model or ""
    if not APP_ID.match(app):
        raise PermanentProviderError(
            f"model '{spec.name}': upstream_model must be a fal app id (owner/app[/path])",
            code="provider_misconfigured",
        )
    return app


def _headers(spec: UpstreamModel) -> dict[str, str]:
    return {"Authorization": f"Key {api_key(spec)}"}


def _request_id(body: dict[str, Any]) -> str:
    value = body.get("request_id")
    if not isinstance(value, str) or not REQUEST_ID.match(value):
        raise PermanentProviderError("fal's request has no usable id", code="upstream_bad_response")
    return value


def _image_url(item: Any) -> Any:
    return item.get("url") if isinstance(item, dict) else None


def _error_type(answer: Answer) -> str | None:
    try:
        body = answer.json()
    except TransientProviderError:
        return None
    kind = body.get("error_type") if isinstance(body, dict) else None
    return str(kind) if kind else None


def _refused(answer: Answer) -> ProviderError:
    """A fal error answer as its error: a model's ``detail`` list (a
    ``content_policy_violation`` entry a refusal) or a request's ``detail`` text."""
    try:
        body = answer.json()
    except TransientProviderError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    policy = False
    if isinstance(detail, list):
        parts = []
        for item in detail[:5]:
            if not isinstance(item, dict):
                continue
            policy = policy or item.get("type") == "content_policy_violation"
            loc = ".".join(str(p) for p in item.get("loc", [])[1:] if p != "body")
            parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        message = "; ".join(parts)
    else:
        message = str(detail) if detail else answer.content[:200].decode(errors="replace")
    kind = _error_type(answer)
    message = f"fal: {message or answer.response.reason_phrase}" + (f" ({kind})" if kind else "")
    error = refusal(answer, message, policy=policy)
    retryable = answer.response.headers.get("x-fal-retryable", "").lower()
    if policy or answer.status in (401, 403, 429):
        return error
    if retryable == "false" and isinstance(error, TransientProviderError):
        return PermanentProviderError(error.message, code="upstream_rejected")
    if retryable == "true" and isinstance(error, PermanentProviderError):
        return TransientProviderError(bounded(message), code="upstream_unavailable")
    return error
