"""``stability``: Stability AI's REST API v2beta, Stable Image generate and inpaint.

One image per call (``capabilities.upstream_max_n: 1``: the worker fans out; a call
for more makes them one after another):

- ``POST {base_url or https://api.stability.ai}/v2beta/stable-image/generate/{endpoint}``,
  the endpoint ``upstream_model``: ``core``, ``ultra`` or ``sd3``; an SD3 model name
  (``sd3.5-large``, ``sd3.5-large-turbo``, ``sd3.5-medium``, ``sd3-large``,
  ``sd3-large-turbo``, ``sd3-medium``) calls ``sd3`` with it as the ``model`` field.
- Edits: ``POST .../v2beta/stable-image/edit/inpaint`` with ``image`` and, where
  the request has one, ``mask`` (ours marks the area to edit with transparent
  pixels; Stability's with white ones: converted). Without a mask Stability
  inpaints the image's transparent pixels, as OpenAI's dall-e-2 does. One image.
- ``multipart/form-data``; ``Authorization: Bearer <key>``; ``Accept:
  application/json``: the answer is ``{"image": base64, "finish_reason", "seed"}``.
  ``finish_reason: CONTENT_FILTERED`` (Stability blurred the image) is our
  ``content_policy_violation``, never an image.
- Fields: ``prompt``; ``aspect_ratio`` from our ``WIDTHxHEIGHT`` (its ratio must be
  one of Stability's: 21:9, 16:9, 3:2, 5:4, 1:1, 4:5, 2:3, 9:16, 9:21; list only
  such sizes in the model's capabilities so our edge refuses the others);
  ``seed`` (image i of a job: seed + i, within Stability's 0-4294967294; 0 is
  Stability's "random"); ``output_format`` (png, jpeg, webp; sd3 has no webp:
  png, re-encoded by the worker). Stability draws each ratio at its own resolution
  (about 1 MP for ultra and sd3, 1.5 MP for core): an image of another size is
  resized to the size asked for. Our request carries no negative prompt, style
  preset or cfg_scale, so none is sent.
- Errors ``{"id", "name", "errors": [...]}``: 403 ``content_moderation`` ->
  ``content_policy_violation``; 400, 413, 422 refused (never retried); 401
  ``upstream_auth_error``; 429 retried after its Retry-After, else the 60 seconds
  Stability's rate limit times a key out for; 5xx retried.

Documents: https://platform.stability.ai/docs/api-reference (the OpenAPI document
served at https://api.stability.ai/v2beta/openapi.json: Stable Image, Generate and
Edit), and "API Key Rate Limit Information" (stabilityplatform.freshdesk.com, article
150000186026: 150 requests in 10 seconds, a 429 then a 60 second time-out).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from math import gcd
from typing import Any, Self

import httpx
from PIL import Image, ImageOps

from shared.core.context import Context, current
from shared.core.errors import (
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
    UnreadableImage,
)
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import Call, GeneratedImage, Generation, Inputs, entry_of
from shared.providers.openai_compat import (
    _TRANSIENT_STATUS,
    MAX_ANSWER_BYTES_PER_IMAGE,
    MAX_ERROR_BYTES,
    _read_capped,
    _retry_after,
    _upstream_errors,
)
from shared.registry import UpstreamModel, parse_size

DEFAULT_BASE_URL = "https://api.stability.ai"
ENDPOINTS = ("core", "ultra", "sd3")
SD3_MODELS = (
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3-large",
    "sd3-large-turbo",
    "sd3-medium",
)
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
# Each ratio by its lowest terms (21:9 is 7:3).
_BY_TERMS = {
    (int(w) // gcd(int(w), int(h)), int(h) // gcd(int(w), int(h))): ratio
    for ratio in ASPECT_RATIOS
    for w, h in [ratio.split(":")]
}
# Seeds Stability takes: 0 to 4294967294 (0 draws one at random).
SEED_LIMIT = 4294967295
# Stability's rate limit times a key out for 60 seconds after its 429.
RATE_LIMIT_TIMEOUT = 60.0
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def aspect_ratio(size: str) -> str | None:
    """Stability's ``aspect_ratio`` for our ``WIDTHxHEIGHT``, or None."""
    wh = parse_size(size)
    if wh is None or 0 in wh:
        return None
    divisor = gcd(*wh)
    return _BY_TERMS.get((wh[0] // divisor, wh[1] // divisor))


def endpoint(spec: UpstreamModel) -> tuple[str, str | None]:
    """The generate endpoint and, for an SD3 model, the ``model`` field."""
    name = spec.upstream_model or spec.name
    if name in ENDPOINTS:
        return name, None
    if name in SD3_MODELS:
        return "sd3", name
    raise PermanentProviderError(
        f"model '{spec.name}': upstream_model {name!r} is none of Stability's endpoints "
        f"({', '.join(ENDPOINTS)}) or SD3 models",
        code="provider_misconfigured",
    )


class StabilityProvider:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def shared(cls) -> StabilityProvider:
        """One HTTP client per process (its context's), shared by worker threads."""
        return current().made("stability", cls._make)

    @classmethod
    def _make(cls, context: Context) -> Self:
        settings = context.settings
        return cls(
            httpx.Client(
                timeout=httpx.Timeout(settings.provider_timeout_seconds, connect=10.0),
                limits=httpx.Limits(
                    max_connections=max(64, settings.worker_concurrency * 2),
                    max_keepalive_connections=128,
                ),
            )
        )

    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, UpstreamModel)
        params = call.params
        if params.operation == "variation":
            raise PermanentProviderError(
                f"model '{spec.name}': Stability has no variations", code="invalid_value"
            )
        images = [
            self._one(spec, params, call.first_index + i, call.inputs) for i in range(call.count)
        ]
        return Generation(images=images)

    def request(
        self, spec: UpstreamModel, params: GenerationParams, index: int, inputs: Inputs | None
    ) -> tuple[str, list[tuple[str, Any]]]:
        """The URL and the multipart form of image ``index`` of the job."""
        base = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        fields: list[tuple[str, Any]] = [("prompt", params.prompt)]
        formats: tuple[str, ...] = ("png", "jpeg", "webp")
        if params.operation == "edit":
            url = f"{base}/v2beta/stable-image/edit/inpaint"
            if inputs is None or len(inputs.images) != 1:
                raise PermanentProviderError(
                    "Stability's inpaint edits one image", code="invalid_value"
                )
            fields.append(("image", ("image", inputs.images[0])))
            if inputs.mask is not None:
                fields.append(("mask", ("mask.png", stability_mask(inputs.mask))))
        else:
            path, model = endpoint(spec)
            url = f"{base}/v2beta/stable-image/generate/{path}"
            if model is not None:
                fields.append(("model", model))
            if path == "sd3":
                formats = ("png", "jpeg")
            if params.size != "auto":
                ratio = aspect_ratio(params.size)
                if ratio is None:
                    raise PermanentProviderError(
                        f"size {params.size} has no Stability aspect ratio "
                        f"({', '.join(ASPECT_RATIOS)})",
                        code="invalid_value",
                    )
                fields.append(("aspect_ratio", ratio))
        if params.seed is not None:
            fields.append(("seed", str((params.seed + index) % SEED_LIMIT)))
        fields.append(
            ("output_format", params.output_format if params.output_format in formats else "png")
        )
        # Every field a part of its own (no filename for text): multipart even
        # without a file, as the API requires.
        return url, [
            (name, value if isinstance(value, tuple) else (None, value)) for name, value in fields
        ]

    def _one(
        self, spec: UpstreamModel, params: GenerationParams, index: int, inputs: Inputs | None
    ) -> GeneratedImage:
        url, form = self.request(spec, params, index, inputs)
        headers = {"Accept": "application/json"}
        key = spec.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with (
            _upstream_errors(),
            self.client.stream("POST", url, headers=headers, files=form) as response,
        ):
            if response.status_code >= 400:
                raise refusal(response, _read_capped(response, MAX_ERROR_BYTES, "error"))
            before_answer()  # the body only once the job holds an answer slot
            content = _read_capped(response, MAX_ANSWER_BYTES_PER_IMAGE, "answer")
        data = answer_image(content)
        return GeneratedImage(fitted(data, params.size))


def answer_image(content: bytes) -> bytes:
    """The image of a 200 answer (``{"image", "finish_reason", "seed"}``); a
    CONTENT_FILTERED one is a refusal."""
    try:
        body = json.loads(content)
    except ValueError as exc:
        raise TransientProviderError(
            "Stability answered something other than JSON", code="upstream_bad_response"
        ) from exc
    if not isinstance(body, dict):
        raise TransientProviderError(
            "Stability's answer is no object", code="upstream_bad_response"
        )
    if body.get("finish_reason") == "CONTENT_FILTERED":
        raise PermanentProviderError(
            "The image was flagged by Stability's content moderation.",
            code="content_policy_violation",
        )
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise TransientProviderError("Stability answered no image", code="upstream_bad_response")
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TransientProviderError(
            "Stability sent invalid base64", code="upstream_bad_response"
        ) from exc


def refusal(response: httpx.Response, content: bytes) -> ProviderError:
    """Stability's error answer (``{"id", "name", "errors"}``) as our provider error."""
    status = response.status_code
    name, errors = None, []
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        name = body.get("name") if isinstance(body.get("name"), str) else None
        if isinstance(body.get("errors"), list):
            errors = [str(error) for error in body["errors"]]
    message = "; ".join(errors) or name or content[:500].decode(errors="replace")
    message = message or response.reason_phrase
    if name == "content_moderation":
        return PermanentProviderError(
            message or "The request was flagged by Stability's content moderation.",
            code="content_policy_violation",
        )
    if status in _TRANSIENT_STATUS:
        retry_after = _retry_after(response)
        if status == 429 and retry_after is None:
            retry_after = RATE_LIMIT_TIMEOUT
        return TransientProviderError(
            f"Stability answered {status}: {message}",
            code="upstream_rate_limited" if status == 429 else "upstream_unavailable",
            retry_after=retry_after,
        )
    if status in (401, 403):
        return PermanentProviderError(message, code="upstream_auth_error")
    return PermanentProviderError(
        f"Stability refused the request ({status}): {message}", code="upstream_rejected"
    )


def stability_mask(mask: bytes) -> bytes:
    """Our mask (transparent pixels: edit there) as Stability's (white: edit there)."""
    try:
        picture = Image.open(io.BytesIO(mask))
        alpha = picture.convert("RGBA").getchannel("A")
    except Exception as exc:  # Pillow raises several unrelated types here
        raise UnreadableImage(f"the mask is unreadable: {exc}") from exc
    buf = io.BytesIO()
    ImageOps.invert(alpha).save(buf, format="PNG")
    return buf.getvalue()


def fitted(data: bytes, size: str) -> bytes:
    """The image at ``size`` (Stability draws each ratio at its own resolution):
    kept as it came when it has that size already."""
    wh = parse_size(size)
    if wh is None:
        return data
    try:
        picture = Image.open(io.BytesIO(data))
        if picture.size == wh:
            return data
        fmt = picture.format or "PNG"
        picture.load()
    except Exception as exc:  # Pillow raises several unrelated types here
        raise UnreadableImage(f"provider returned an unreadable image: {exc}") from exc
    buf = io.BytesIO()
    picture.resize(wh, Image.Resampling.LANCZOS).save(
        buf, format=fmt if fmt in _FORMATS.values() else "PNG"
    )
    return buf.getvalue()
