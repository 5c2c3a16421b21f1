"""``google``: the Gemini API's image models (Google AI for developers).

One kind, two families, told apart by ``upstream_model``:

- **Gemini image models** (``gemini-2.5-flash-image``, ``gemini-3-pro-image-preview``
  ...): ``POST {base_url}/models/{model}:generateContent`` with ``contents:
  [{parts: [{text: prompt}, {inlineData}...]}]`` (an edit's input images as
  ``inlineData`` parts after the prompt) and ``generationConfig``:
  ``responseModalities: ["TEXT", "IMAGE"]``, ``imageConfig.aspectRatio`` (and
  ``imageSize`` 2K/4K for larger sizes), ``seed`` (the job's ``seed + index``,
  modulo 2**31: the field is an int32). The images are the answer's
  ``candidates[].content.parts[].inlineData`` (thought parts skipped); the model
  makes one image a call, so an entry sets ``capabilities.upstream_max_n: 1`` and
  the worker fans out. ``promptFeedback.blockReason`` or a candidate's
  ``finishReason`` among REFUSED_FINISH is a refusal (``content_policy_violation``,
  not retried); an answer with no image otherwise (text only, ``NO_IMAGE``) is
  worth another try. ``usageMetadata`` becomes our usage: ``promptTokenCount`` the
  input tokens, ``candidatesTokenCount`` plus ``thoughtsTokenCount`` (billed as
  output) the output tokens, the per-modality details as text and image tokens.
- **Imagen** (``imagen-4.0-generate-001`` ...): ``POST {base_url}/models/{model}
  :predict`` with ``instances: [{prompt}]`` and ``parameters``: ``sampleCount``
  (the call's n), ``aspectRatio``, ``sampleImageSize: "2K"`` for larger sizes and
  ``includeRaiReason: true``; the images are ``predictions[].bytesBase64Encoded``.
  An image filtered by Google's responsible-AI checks comes back as a prediction
  with ``raiFilteredReason`` instead: fewer images than asked, with a reason, is a
  refusal (``content_policy_violation``); fewer without one is a bad answer, tried
  again. The Gemini API takes no seed for Imagen (Google's SDK refuses one outside
  Vertex AI), so none is sent; nor ``personGeneration``, which we do not carry.
  Imagen on the Gemini API makes no edits: an edit is refused.

Sizes: our ``WIDTHxHEIGHT`` is sent as the documented aspect ratio it is (its
ratio reduced) or is nearest to, within RATIO_TOLERANCE (Google's own pixel sizes
are near the ratio, not on it: 1344x768 is 16:9, 896x1280 is 3:4); a longer side
over 1600 asks for 2K, over 3200 for 4K (Gemini only). A size with no such ratio
fails the job (``invalid_value``): an entry lists only sizes that map, and our
edge refuses the rest. ``auto`` sends no aspect ratio (the model's choice; an
edit keeps its input's).

Auth: the key in ``api_key_env``, in the ``x-goog-api-key`` header. Errors are
Google's ``{"error": {"code", "message", "status", "details"}}``: 429
``RESOURCE_EXHAUSTED``, 500 ``INTERNAL``, 503 ``UNAVAILABLE`` and 504
``DEADLINE_EXCEEDED`` are retried (a ``Retry-After`` header, else the
``google.rpc.RetryInfo`` detail's ``retryDelay``, sets the wait); 402
``RESOURCE_EXHAUSTED`` (prepaid credit spent), 400 ``INVALID_ARGUMENT`` /
``FAILED_PRECONDITION``, 401/403 and 404 are not (a 400 whose ``ErrorInfo`` says
``API_KEY_INVALID`` is ``upstream_auth_error``; one naming Google's Responsible AI
practices, Imagen's prompt refusal, is ``content_policy_violation``).

Not covered: Google's long-running operations (``:predictLongRunning``, Veo video),
streaming (``streamGenerateContent``), Vertex AI's endpoints and auth, Imagen's
editing and upscaling (Vertex AI only), multi-turn image chats.

Documents: https://ai.google.dev/api/generate-content (GenerationConfig,
ImageConfig, promptFeedback, FinishReason, UsageMetadata),
https://ai.google.dev/gemini-api/docs/image-generation,
https://ai.google.dev/gemini-api/docs/imagen,
https://ai.google.dev/gemini-api/docs/troubleshooting (error codes), the protos
google/ai/generativelanguage/v1beta/{generative_service,prediction_service}.proto
(googleapis/googleapis), and Google's SDK googleapis/python-genai (models.py: the
Gemini API's request and answer fields for generate_content and generate_images).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import quote

import httpx

from shared.core.context import current
from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.core.storable import clean
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    entry_of,
    mime_type,
)
from shared.providers.openai_compat import (
    _TRANSIENT_STATUS,
    MAX_ANSWER_BYTES_PER_IMAGE,
    MAX_ERROR_BYTES,
    OpenAICompatibleProvider,
    _read_capped,
    _retry_after,
    _upstream_errors,
)
from shared.registry import UpstreamModel

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
CONTENT_POLICY = "content_policy_violation"

Family = Literal["gemini", "imagen"]

# The aspect ratios each family documents (imageConfig.aspectRatio; Imagen's
# parameters.aspectRatio).
GEMINI_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
# How far (as a fraction of the ratio) a size may be from the documented ratio it
# is sent as: Google's own sizes for a ratio are up to 7% off it (Imagen's 896x1280
# for 3:4).
RATIO_TOLERANCE = 0.08
# Longer sides above these ask for the larger image sizes (1K is each model's default).
TIERS: dict[Family, tuple[tuple[int, str], ...]] = {
    "gemini": ((3200, "4K"), (1600, "2K")),
    "imagen": ((1600, "2K"),),
}
# A candidate's finishReason that means Google refused (safety, prohibited content,
# blocklists, personal data, recitation): content_policy_violation, never retried.
REFUSED_FINISH = frozenset(
    {
        "SAFETY",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_INT32 = 2**31


def family_of(model: str) -> Family:
    """Which API an upstream model speaks: Imagen models ``:predict``, the rest
    ``:generateContent``."""
    return "imagen" if model.rsplit("/", 1)[-1].startswith("imagen") else "gemini"


@dataclass(frozen=True)
class Shape:
    """What a size is sent as: a documented aspect ratio and, above 1K, an image size."""

    aspect_ratio: str | None
    image_size: str | None = None


def shape_of(size: str, family: Family) -> Shape | None:
    """``size`` (``WIDTHxHEIGHT`` or ``auto``) as ``family`` takes it, or None where
    it has no documented aspect ratio."""
    if size == "auto":
        return Shape(None)
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) * int(height):
        return None
    w, h = int(width), int(height)
    ratios = GEMINI_RATIOS if family == "gemini" else IMAGEN_RATIOS
    divisor = math.gcd(w, h)
    exact = f"{w // divisor}:{h // divisor}"
    if exact in ratios:
        ratio: str | None = exact
    else:
        # The nearest documented ratio, compared as logarithms (2:1 and 1:2 are as far
        # from 1:1), if near enough.
        distance, ratio = min((abs(math.log(w / h / _value(r))), r) for r in ratios)
        if distance > math.log1p(RATIO_TOLERANCE):
            ratio = None
    if ratio is None:
        return None
    tier = next((name for side, name in TIERS[family] if max(w, h) > side), None)
    return Shape(ratio, tier)


def _value(ratio: str) -> float:
    width, _, height = ratio.partition(":")
    return int(width) / int(height)


def gemini_request(
    spec: UpstreamModel, params: GenerationParams, first_index: int, inputs: Inputs | None
) -> dict[str, Any]:
    """A generateContent body for one image (``first_index`` of the job)."""
    shape = _shape(spec, params.size, "gemini")
    parts: list[dict[str, Any]] = [{"text": params.prompt}]
    if params.operation == "edit":
        if inputs is None or not inputs.images:
            raise PermanentProviderError("an edit needs an input image", code="invalid_value")
        if inputs.mask is not None:
            raise PermanentProviderError(
                f"model '{spec.name}' takes no mask: describe the change in the prompt",
                param="mask",
                code="invalid_value",
            )
        parts += [
            {"inlineData": {"mimeType": mime_type(data), "data": base64.b64encode(data).decode()}}
            for data in inputs.images
        ]
    elif params.operation != "generate":
        raise PermanentProviderError(
            f"model '{spec.name}' makes no {params.operation}s", code="invalid_value"
        )
    config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"]}
    image_config = {"aspectRatio": shape.aspect_ratio, "imageSize": shape.image_size}
    image_config = {name: value for name, value in image_config.items() if value}
    if image_config:
        config["imageConfig"] = image_config
    if params.seed is not None:
        config["seed"] = (params.seed + first_index) % _INT32
    return {"contents": [{"parts": parts}], "generationConfig": config}


def imagen_request(spec: UpstreamModel, params: GenerationParams, count: int) -> dict[str, Any]:
    """A predict body for ``count`` images."""
    if params.operation != "generate":
        raise PermanentProviderError(
            f"model '{spec.name}' makes no {params.operation}s on the Gemini API",
            code="invalid_value",
        )
    shape = _shape(spec, params.size, "imagen")
    parameters: dict[str, Any] = {"sampleCount": count, "includeRaiReason": True}
    if shape.aspect_ratio:
        parameters["aspectRatio"] = shape.aspect_ratio
    if shape.image_size:
        parameters["sampleImageSize"] = shape.image_size
    return {"instances": [{"prompt": params.prompt}], "parameters": parameters}


def _shape(spec: UpstreamModel, size: str, family: Family) -> Shape:
    shape = shape_of(size, family)
    if shape is None:
        ratios = ", ".join(GEMINI_RATIOS if family == "gemini" else IMAGEN_RATIOS)
        raise PermanentProviderError(
            f"size {size} has no aspect ratio model '{spec.name}' takes ({ratios})",
            param="size",
            code="invalid_value",
        )
    return shape


def gemini_images(body: Any, count: int) -> Generation:
    """The images of a generateContent answer (the first ``count``), or the
    provider error it means."""
    if not isinstance(body, dict):
        raise _bad("Google answered without a JSON object")
    feedback = body.get("promptFeedback")
    blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if blocked and blocked != "BLOCK_REASON_UNSPECIFIED":
        raise PermanentProviderError(
            f"Google blocked the prompt (blockReason {blocked}).", code=CONTENT_POLICY
        )
    candidates = body.get("candidates")
    images: list[GeneratedImage] = []
    texts: list[str] = []
    reasons: list[str] = []
    for candidate in candidates if isinstance(candidates, list) else []:
        if not isinstance(candidate, dict):
            continue
        if isinstance(candidate.get("finishReason"), str):
            reasons.append(candidate["finishReason"])
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict) or part.get("thought"):
                continue  # a thinking model's interim pictures are not its answer
            inline = part.get("inlineData")
            if isinstance(inline, dict) and str(inline.get("mimeType", "")).startswith("image/"):
                images.append(GeneratedImage(_decode(inline.get("data"))))
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    if len(images) >= count:
        return Generation(images=images[:count], usage=gemini_usage(body.get("usageMetadata")))
    said = f": {(clean(' '.join(texts)) or '')[:300]}" if texts else ""
    refused = [reason for reason in reasons if reason in REFUSED_FINISH]
    if refused:
        raise PermanentProviderError(
            f"Google refused to make the image (finishReason {refused[0]}){said}",
            code=CONTENT_POLICY,
        )
    why = f"finishReason {reasons[0]}" if reasons else "no candidate"
    raise _bad(f"Google answered {len(images)} images for n={count} ({why}){said}")


def gemini_usage(metadata: Any) -> dict[str, Any] | None:
    """``usageMetadata`` as our usage (OpenAI's image usage shape): thinking tokens
    are billed as output, so they count among the output tokens."""
    if not isinstance(metadata, dict):
        return None
    if not any(_count(metadata.get(name)) for name in ("promptTokenCount", "candidatesTokenCount")):
        return None
    tokens_in = _tokens(metadata.get("promptTokenCount"))
    tokens_out = _tokens(metadata.get("candidatesTokenCount")) + _tokens(
        metadata.get("thoughtsTokenCount")
    )
    total = metadata.get("totalTokenCount")
    usage: dict[str, Any] = {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": _tokens(total) if _count(total) else tokens_in + tokens_out,
    }
    for ours, theirs in (
        ("input_tokens_details", "promptTokensDetails"),
        ("output_tokens_details", "candidatesTokensDetails"),
    ):
        details = metadata.get(theirs)
        if isinstance(details, list):
            by = {"text_tokens": 0, "image_tokens": 0}
            for item in details:
                if isinstance(item, dict):
                    name = {"TEXT": "text_tokens", "IMAGE": "image_tokens"}.get(
                        str(item.get("modality"))
                    )
                    if name:
                        by[name] += _tokens(item.get("tokenCount"))
            usage[ours] = by
    return usage


def imagen_images(body: Any, count: int) -> Generation:
    """The images of a predict answer, or the provider error it means."""
    predictions = body.get("predictions") if isinstance(body, dict) else None
    images: list[GeneratedImage] = []
    filtered: list[str] = []
    for item in predictions if isinstance(predictions, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("bytesBase64Encoded"):
            images.append(GeneratedImage(_decode(item["bytesBase64Encoded"])))
        elif isinstance(item.get("raiFilteredReason"), str):
            filtered.append(clean(item["raiFilteredReason"]) or "")
    if len(images) >= count:
        return Generation(images=images[:count])
    if filtered:
        raise PermanentProviderError(
            f"Google filtered {count - len(images)} of {count} images: {filtered[0][:300]}",
            code=CONTENT_POLICY,
        )
    raise _bad(f"Google answered {len(images)} images for n={count}")


def _decode(data: Any) -> bytes:
    try:
        if not isinstance(data, str):
            raise ValueError("no data")
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad("Google sent an image that is not base64") from exc


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tokens(value: Any) -> int:
    """A token count as reported, 0 where it is missing or not a count."""
    return int(value) if _count(value) else 0


def _bad(message: str) -> TransientProviderError:
    return TransientProviderError(message, code="upstream_bad_response")


class GoogleProvider:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def shared(cls) -> GoogleProvider:
        """The process's one instance, on the process's one provider HTTP client
        (the OpenAI-compatible provider's: one bounded pool for every upstream)."""
        client = OpenAICompatibleProvider.shared().client
        return current().made("google", lambda _: cls(client))

    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, UpstreamModel)
        model = spec.upstream_model or spec.name
        family = family_of(model)
        if family == "gemini":
            if call.count != 1:
                raise PermanentProviderError(
                    f"model '{spec.name}': a Gemini model makes one image a call; set "
                    "capabilities.upstream_max_n: 1",
                    code="provider_misconfigured",
                )
            payload = gemini_request(spec, call.params, call.first_index, call.inputs)
            method = "generateContent"
        else:
            payload = imagen_request(spec, call.params, call.count)
            method = "predict"
        base = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        url = f"{base}/models/{quote(model.removeprefix('models/'), safe='.-_')}:{method}"
        key = spec.api_key()
        headers = {"x-goog-api-key": key} if key else {}
        with (
            _upstream_errors(),
            self.client.stream("POST", url, headers=headers, json=payload) as response,
        ):
            if response.status_code >= 400:
                refuse(response, _read_capped(response, MAX_ERROR_BYTES, "error"))
            # The body only once the job holds an answer slot (shared/providers/answers.py).
            before_answer()
            limit = max(call.count, 2) * MAX_ANSWER_BYTES_PER_IMAGE
            content = _read_capped(response, limit, "answer")
        try:
            body = json.loads(content)
        except ValueError as exc:
            raise _bad("Google answered something that is not JSON") from exc
        if family == "gemini":
            return gemini_images(body, call.count)
        return imagen_images(body, call.count)


def refuse(response: httpx.Response, content: bytes) -> NoReturn:
    """Google's error answer (``{"error": {"code", "message", "status", "details"}}``)
    as the provider error it means."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = clean(str(error.get("message") or "")) or response.reason_phrase or "no message"
    status = str(error.get("status") or "")
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    http = response.status_code
    said = f"Google answered {http} {status}: {message}".replace("  ", " ")
    if http == 429 or (http != 402 and status == "RESOURCE_EXHAUSTED"):
        raise TransientProviderError(
            said, code="upstream_rate_limited", retry_after=_wait(response, details)
        )
    if http == 504 or status == "DEADLINE_EXCEEDED":
        raise TransientProviderError(
            said, code="upstream_timeout", retry_after=_wait(response, details)
        )
    if http in _TRANSIENT_STATUS or status in ("UNAVAILABLE", "INTERNAL"):
        raise TransientProviderError(
            said, code="upstream_unavailable", retry_after=_wait(response, details)
        )
    reasons = {str(d.get("reason")) for d in details if "ErrorInfo" in str(d.get("@type"))}
    if http in (401, 403) or status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        raise PermanentProviderError(said, code="upstream_auth_error")
    if "API_KEY_INVALID" in reasons:
        raise PermanentProviderError(said, code="upstream_auth_error")
    if http == 404 or status == "NOT_FOUND":
        raise PermanentProviderError(said, code="provider_misconfigured")
    if "responsible ai" in message.lower():
        raise PermanentProviderError(message, code=CONTENT_POLICY)
    raise PermanentProviderError(said, code="upstream_rejected")


def _wait(response: httpx.Response, details: list[dict[str, Any]]) -> float | None:
    """Seconds to wait: a Retry-After header, else RetryInfo's ``retryDelay``
    (a protobuf Duration in JSON: ``"30s"``, ``"1.5s"``)."""
    header = _retry_after(response)
    if header is not None:
        return header
    for detail in details:
        if "RetryInfo" in str(detail.get("@type")):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None
