"""``replicate``: Replicate's predictions API (https://replicate.com/docs/reference/http).

A prediction is created with ``POST {base_url}/models/{owner}/{name}/predictions``
for an official model (``upstream_model: owner/name``) or ``POST
{base_url}/predictions`` with ``{"version": ...}`` for a model version
(``owner/name:version``), the body ``{"input": {...}}``, the key as ``Authorization:
Bearer``. The prediction (``id``, ``status`` starting | processing | succeeded |
failed | canceled, ``output`` a URL or a list of them, ``error``) is looked at with
``GET {base_url}/predictions/{id}`` and canceled with ``POST .../{id}/cancel``; the
URLs of ``urls.get``/``urls.cancel`` are not followed (our key goes only to
``base_url``). Output files are downloaded into memory
(``OpenAICompatibleProvider._download``: its origin and SSRF checks) and never
reach our client.

The input: ``prompt``; the size as ``aspect_ratio`` (the nearest of the ratios
Replicate's image models take, within 5%) and as ``width``/``height`` (models take
one or the other, and Replicate drops inputs a model does not define); ``num_outputs``
when the call asks for more than one; ``seed`` (the job's seed plus the call's first
image index: a fanned-out call's images differ); ``output_format``.

Edits and variations (https://replicate.com/docs/topics/predictions/input-files): the
input image, and an edit's mask (white where to edit), go on the model's inputs the
entry's ``file_inputs`` name (unset: FLUX Kontext's ``input_image``; FLUX Fill and
SDXL inpainting take ``image`` and ``mask``, FLUX Redux's variations
``redux_image``). A file under 1 MB goes inline as a data URI, as the document
recommends only for such; a larger one is uploaded first (``POST {base_url}/files``,
multipart ``content``: https://sdks.replicate.com/resources/files/methods/create)
and its ``urls.get`` passed, as Replicate's own clients do. A variation sends no
prompt. The size is sent as for a generation; a model listing ``auto`` sends none
(FLUX Kontext then matches the input image's ratio).

Errors are RFC 7807 problem details (``{"title", "detail", "status"}``): 401/403
bad credentials, 402 no credit, 404 and 422 (input validation) refusals, 429 with
``Retry-After`` and 5xx transient. A prediction that ``failed`` with an error naming
NSFW or sensitive content is a ``content_policy_violation``; another failure is
permanent, with the upstream's error text (bounded).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from shared.core.context import current
from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.core.settings import get_settings
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Pending,
    entry_of,
    mime_type,
)
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
    unseen,
    wait_in_place,
)
from shared.registry import ModelSpec, UpstreamModel, parse_size
from shared.registry.entries import FileInputs

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
# owner/name, or owner/name:version.
MODEL = re.compile(r"^([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)(?::([A-Za-z0-9]+))?$")
PREDICTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# The aspect ratios Replicate's image models take (FLUX, Stable Diffusion 3.5,
# Imagen, Ideogram), as width:height.
ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
RATIO_TOLERANCE = 0.05
# A failed prediction's error saying its input or output was refused as unsafe.
POLICY = re.compile(r"nsfw|sensitive|safety|content policy|moderation", re.IGNORECASE)
# The longest synchronous wait a call in place asks for (``Prefer: wait``, 1 to 60).
MAX_WAIT_SECONDS = 60
PENDING = ("starting", "processing")
# An edit's files, unless the entry names others: FLUX Kontext's input image.
DEFAULT_FILE_INPUTS = FileInputs(image="input_image")
# Replicate recommends a data URI only for a file under 1 MB; a larger one is
# uploaded with the files API.
MAX_DATA_URI_BYTES = 1_000_000
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ReplicateProvider:
    def __init__(self, fetcher: OpenAICompatibleProvider) -> None:
        self.fetcher = fetcher  # its client and its _download (the origin and SSRF checks)
        self.client = fetcher.client

    @classmethod
    def shared(cls) -> ReplicateProvider:
        """The process's one instance: its own HTTP client, pooled as the openai
        provider's, shared by every worker thread."""
        return current().made(
            "replicate", lambda context: cls(OpenAICompatibleProvider._make(context))
        )

    # --- QueueProvider -------------------------------------------------------------

    def submit(self, call: Call) -> dict[str, Any]:
        return self._create(call, wait=None)

    def poll(self, call: Call, ref: dict[str, Any]) -> Generation | Pending:
        spec = entry_of(call.spec, UpstreamModel)
        url = f"{base_url(spec, DEFAULT_BASE_URL)}/predictions/{_prediction_id(ref)}"
        try:
            answer = exchange(self.client, "GET", url, _headers(spec))
        except TransientProviderError as exc:
            return unseen(exc, spec)
        if answer.status == 404:  # not (any more) under this key: submitted anew
            raise TransientProviderError(
                "replicate knows no such prediction", code="upstream_unavailable"
            )
        if answer.status >= 400:
            error = _refused(answer)
            if isinstance(error, TransientProviderError):
                return unseen(error, spec)
            raise error
        prediction = _prediction(answer)
        status = str(prediction.get("status"))
        if status in PENDING:
            return Pending(after=spec.poll_seconds, status=status)
        if status == "succeeded":
            return self._generation(call, prediction, url)
        raise _failed(prediction, status)

    def cancel(self, spec: ModelSpec, ref: dict[str, Any]) -> None:
        upstream = entry_of(spec, UpstreamModel)
        try:
            prediction = _prediction_id(ref)
            url = f"{base_url(upstream, DEFAULT_BASE_URL)}/predictions/{prediction}/cancel"
            answer = exchange(self.client, "POST", url, _headers(upstream))
        except ProviderError as exc:
            log.warning("replicate: cancel failed: %s", exc.message)
            return
        if answer.status >= 400:
            log.warning("replicate: cancel answered %d", answer.status)

    # --- Provider ------------------------------------------------------------------

    def generate(self, call: Call) -> Generation:
        """Create with a synchronous wait (``Prefer: wait``), then look until done."""
        wait = max(1, min(MAX_WAIT_SECONDS, int(get_settings().provider_timeout_seconds)))
        return wait_in_place(call, lambda: self._create(call, wait), self.poll, self.cancel)

    # --- the calls -----------------------------------------------------------------

    def _create(self, call: Call, wait: int | None) -> dict[str, Any]:
        spec = entry_of(call.spec, UpstreamModel)
        path, body = _route(spec)
        body["input"] = prediction_input(call.params, call.count, call.first_index)
        if call.params.operation != "generate":
            if call.params.operation == "variation":  # the image alone: no prompt
                del body["input"]["prompt"]
            names = spec.file_inputs or DEFAULT_FILE_INPUTS
            body["input"].update(file_fields(call, names, lambda data: self._file(spec, data)))
        headers = _headers(spec)
        if wait:
            headers["Prefer"] = f"wait={wait}"
        answer = exchange(
            self.client, "POST", base_url(spec, DEFAULT_BASE_URL) + path, headers, body
        )
        if answer.status >= 400:
            raise _refused(answer)
        prediction = _prediction(answer)
        ref: dict[str, Any] = {"id": _prediction_id(prediction)}
        urls = prediction.get("urls")
        if isinstance(urls, dict):  # kept for people reading the job, never followed
            ref["urls"] = {k: v for k, v in urls.items() if k in ("get", "cancel")}
        return ref

    def _file(self, spec: UpstreamModel, data: bytes) -> str:
        """An input file as a prediction takes it: a data URI under 1 MB, else the
        URL of the file uploaded (``POST {base_url}/files``)."""
        if len(data) < MAX_DATA_URI_BYTES:
            return data_uri(data)
        kind = mime_type(data)
        form = [("content", (f"input.{EXTENSIONS[kind]}", data, kind))]
        url = f"{base_url(spec, DEFAULT_BASE_URL)}/files"
        answer = exchange(self.client, "POST", url, _headers(spec), files=form)
        if answer.status >= 400:
            raise _refused(answer)
        uploaded = answer.json()
        urls = uploaded.get("urls") if isinstance(uploaded, dict) else None
        got = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(got, str) or not got:
            raise TransientProviderError(
                "replicate answered the upload without its URL", code="upstream_bad_response"
            )
        return got

    def _generation(self, call: Call, prediction: dict[str, Any], upstream: str) -> Generation:
        urls = output_urls(prediction.get("output"))
        if not urls and prediction.get("data_removed"):
            raise TransientProviderError(
                "replicate removed the prediction's output", code="upstream_unavailable"
            )
        if len(urls) < call.count:
            raise PermanentProviderError(
                f"replicate returned {len(urls)} images for {call.count} asked (a model "
                "without num_outputs needs capabilities.upstream_max_n: 1)",
                code="upstream_bad_response",
            )
        before_answer()  # the images are read holding the job's answer slot
        images = [
            GeneratedImage(fetch_image(self.fetcher, url, upstream)) for url in urls[: call.count]
        ]
        return Generation(images=images)


def prediction_input(params: GenerationParams, count: int, first_index: int) -> dict[str, Any]:
    """A prediction's ``input`` for images ``first_index`` .. of a job."""
    model_input: dict[str, Any] = {"prompt": params.prompt}
    size = parse_size(params.size)
    if size is not None:
        ratio = aspect_ratio(*size)
        if ratio is not None:
            model_input["aspect_ratio"] = ratio
        model_input["width"], model_input["height"] = size
    if count > 1:
        model_input["num_outputs"] = count
    if params.seed is not None:
        model_input["seed"] = params.seed + first_index
    model_input["output_format"] = "jpg" if params.output_format == "jpeg" else params.output_format
    return model_input


def aspect_ratio(width: int, height: int) -> str | None:
    """The nearest of ASPECT_RATIOS to ``width``:``height``, if within 5%."""

    def value(ratio: str) -> float:
        w, h = ratio.split(":")
        return int(w) / int(h)

    wanted = width / height
    nearest = min(ASPECT_RATIOS, key=lambda r: abs(value(r) - wanted) / value(r))
    return nearest if abs(value(nearest) - wanted) / value(nearest) <= RATIO_TOLERANCE else None


def output_urls(output: Any) -> list[Any]:
    """A prediction's output files: one URL, or a list of them."""
    if isinstance(output, list):
        return output
    return [output] if output else []


def _route(spec: UpstreamModel) -> tuple[str, dict[str, Any]]:
    """The create path and the body's fields for ``upstream_model``."""
    match = MODEL.match(spec.upstream_model or "")
    if match is None:
        raise PermanentProviderError(
            f"model '{spec.name}': upstream_model must be owner/name or owner/name:version",
            code="provider_misconfigured",
        )
    owner, name, version = match.groups()
    if version:
        return "/predictions", {"version": version}
    return f"/models/{owner}/{name}/predictions", {}


def _headers(spec: UpstreamModel) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(spec)}"}


def _prediction(answer: Answer) -> dict[str, Any]:
    body = answer.json()
    if not isinstance(body, dict):
        raise TransientProviderError(
            "replicate answered without a prediction", code="upstream_bad_response"
        )
    return body


def _prediction_id(ref: dict[str, Any]) -> str:
    value = ref.get("id")
    if not isinstance(value, str) or not PREDICTION_ID.match(value):
        raise PermanentProviderError(
            "replicate's prediction has no usable id", code="upstream_bad_response"
        )
    return value


def _failed(prediction: dict[str, Any], status: str) -> ProviderError:
    error = prediction.get("error")
    text = str(error) if error else f"the prediction {status}"
    if status == "failed":
        if POLICY.search(text):
            return PermanentProviderError(bounded(text), code="content_policy_violation")
        return PermanentProviderError(bounded(f"replicate: {text}"), code="upstream_rejected")
    if status == "canceled":
        return PermanentProviderError(
            "replicate: the prediction was canceled", code="upstream_rejected"
        )
    if status == "aborted":  # ended before it ran (a deadline): nothing was made
        return TransientProviderError(
            "replicate: the prediction was aborted", code="upstream_unavailable"
        )
    return PermanentProviderError(
        f"replicate answered an unknown status {bounded(status)!r}", code="upstream_bad_response"
    )


def _refused(answer: Answer) -> ProviderError:
    """A problem-details answer (``{"title", "detail", "status"}``) as its error."""
    try:
        body = answer.json()
    except TransientProviderError:
        body = None
    parts: list[str] = []
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("title", "detail") if body.get(k)]
    message = ": ".join(parts) or answer.content[:200].decode(errors="replace")
    message = f"replicate: {message or answer.response.reason_phrase}"
    policy = answer.status in (400, 422) and POLICY.search(message) is not None
    return refusal(answer, message, policy=policy)
