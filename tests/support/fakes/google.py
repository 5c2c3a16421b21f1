"""A fake of the Gemini API's image endpoints (Google AI for developers), over real
HTTP on 127.0.0.1, as Google documents them:

- https://ai.google.dev/api/generate-content: ``POST /v1beta/models/{model}
  :generateContent``; the request's ``contents[].parts[]`` (``text``, ``inlineData
  {mimeType, data}``) and ``generationConfig`` (``responseModalities``,
  ``imageConfig {aspectRatio, imageSize}``, ``seed``, an int32); the answer's
  ``candidates[].content.parts[]`` with ``inlineData`` images, ``finishReason``,
  ``promptFeedback.blockReason`` and ``usageMetadata`` (``promptTokenCount``,
  ``candidatesTokenCount``, ``totalTokenCount``, per-modality details);
- https://ai.google.dev/gemini-api/docs/image-generation: the aspect ratios
  (1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9) and image sizes (1K, 2K,
  4K; gemini-2.5-flash-image makes 1K only);
- https://ai.google.dev/gemini-api/docs/imagen: ``POST /v1beta/models/{model}:predict``
  with ``instances: [{prompt}]`` and ``parameters`` (``sampleCount`` 1 to 4,
  ``aspectRatio`` 1:1, 3:4, 4:3, 9:16, 16:9, ``sampleImageSize`` 1K or 2K, not on
  the fast model, ``personGeneration``; Google's SDK adds ``includeRaiReason`` and
  refuses a seed on the Gemini API), answering ``predictions[]`` of
  ``{bytesBase64Encoded, mimeType}``, a filtered image as ``{raiFilteredReason}``;
- https://ai.google.dev/gemini-api/docs/troubleshooting and
  https://ai.google.dev/api (auth): the key in ``x-goog-api-key``; errors as
  ``{"error": {"code", "message", "status", "details"}}``: 400 INVALID_ARGUMENT (a
  bad key too, with an ``ErrorInfo`` of reason API_KEY_INVALID), 403
  PERMISSION_DENIED (no key), 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED (with a
  ``RetryInfo`` detail's ``retryDelay``), 503 UNAVAILABLE.

Unknown fields are refused as Google refuses them (400 "Invalid JSON payload
received. Unknown name ..."). Behaviour by markers in the prompt, counted per
prompt: ``[429-once]`` a 429 first (``retry_delay`` in its RetryInfo),
``[503-once]`` a 503 first, ``[blocked]`` a blocked prompt (Gemini:
``promptFeedback.blockReason``; Imagen: the 400 naming Google's Responsible AI
practices), ``[image-safety]`` every image filtered (Gemini: ``finishReason``
IMAGE_SAFETY; Imagen: ``raiFilteredReason``), ``[filter-one]`` one Imagen image
filtered, ``[text-only]`` a Gemini answer with text and no image, ``[thoughts]`` a
thought image before the answer's. Images are small PNGs with the requested
aspect ratio (48 pixels a side for 1:1, twice that for 2K, four times for 4K).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

EXPECTED_KEY = "google-test-key"
GEMINI_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
SCALE = {"1K": 1, "2K": 2, "4K": 4}
IMAGE_TOKENS = 1290  # what a 1K image costs in output tokens (Google's pricing page)
_PATH = re.compile(r"^/v1beta/models/([A-Za-z0-9.\-_]+):(generateContent|predict)$")
_GEMINI_FIELDS = {
    "contents",
    "generationConfig",
    "safetySettings",
    "systemInstruction",
    "tools",
    "toolConfig",
    "cachedContent",
}
_CONFIG_FIELDS = {
    "responseModalities",
    "imageConfig",
    "seed",
    "candidateCount",
    "temperature",
    "topP",
    "topK",
    "maxOutputTokens",
    "stopSequences",
}
_IMAGEN_PARAMETERS = {
    "sampleCount",
    "aspectRatio",
    "personGeneration",
    "sampleImageSize",
    "includeRaiReason",
    "includeSafetyAttributes",
    "safetySetting",
    "outputOptions",
    "guidanceScale",
    "language",
}
RAI_REASON = (
    "Your current safety filter threshold filtered out 1 generated images. You will "
    "not be charged for blocked images. Try rephrasing the prompt."
)
RESPONSIBLE_AI = (
    "Image generation failed with the following error: The prompt could not be "
    "submitted. This prompt contains sensitive words that violate Google's Responsible "
    "AI practices. Try rephrasing the prompt. If you think this was an error, send "
    "feedback. Support codes: 42876398"
)


class Refused(Exception):
    """An error answer in Google's shape."""

    def __init__(
        self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message
        self.details = details or []

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return json.dumps({"error": error}).encode()


def invalid(message: str) -> Refused:
    return Refused(400, "INVALID_ARGUMENT", message)


def unknown(name: str, where: str) -> Refused:
    return invalid(
        f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field."
    )


def png(size: tuple[int, int], shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (shade % 256, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def pixels(ratio: str | None, image_size: str | None) -> tuple[int, int]:
    """The fake's picture for an aspect ratio and image size."""
    width, height = (int(v) for v in (ratio or "1:1").split(":"))
    side = 48 * SCALE[image_size or "1K"]
    root = math.sqrt(width / height)
    return round(side * root), round(side / root)


def _image(mime: str, data: Any) -> tuple[int, int]:
    """An inlineData image's size, or Refused."""
    try:
        raw = base64.b64decode(str(data), validate=True)
        picture = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError, OSError):
        raise invalid("Provided image is not valid.") from None
    if f"image/{(picture.format or '').lower()}" != mime:
        raise invalid(f"Unable to process input image: it is not {mime}.")
    return picture.size


class FakeGoogle:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.keys: list[str | None] = []  # each request's x-goog-api-key, refused ones too
        self.counts: Counter[str] = Counter()
        self.retry_delay = "1s"  # the RetryInfo of a 429
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1beta"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeGoogle:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_for(self, marker: str) -> list[dict[str, Any]]:
        with self.lock:
            return [call for call in self.calls if marker in call["prompt"]]

    def answer(self, path: str, key: str | None, raw: bytes) -> dict[str, Any]:
        """The answer to one call (the body Google sends with 200), or Refused."""
        with self.lock:
            self.keys.append(key)
        match = _PATH.match(path)
        if match is None:
            raise Refused(404, "NOT_FOUND", f"The requested URL {path} was not found.")
        if not key:
            raise Refused(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to "
                "call this API.",
            )
        if key != EXPECTED_KEY:
            raise Refused(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                    }
                ],
            )
        try:
            body = json.loads(raw)
        except ValueError:
            raise invalid("Invalid JSON payload received.") from None
        if not isinstance(body, dict):
            raise invalid("Invalid JSON payload received. Expected an object.")
        model, method = match.groups()
        imagen = model.startswith("imagen")
        if imagen != (method == "predict"):
            raise Refused(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version v1beta, or is not "
                f"supported for {method}.",
            )
        prompt = _imagen_prompt(body) if imagen else _gemini_prompt(body)
        with self.lock:
            self.counts[prompt] += 1
            count = self.counts[prompt]
            self.calls.append({"model": model, "method": method, "body": body, "prompt": prompt})
        _faults(prompt, count, self.retry_delay)
        return _imagen(model, body, prompt) if imagen else _gemini(model, body, prompt)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if not self.headers.get("Content-Type", "").startswith("application/json"):
                        raise invalid("Invalid JSON payload received.")
                    status = 200
                    body = json.dumps(
                        fake.answer(self.path, self.headers.get("x-goog-api-key"), raw)
                    ).encode()
                except Refused as refused:
                    status, body = refused.code, refused.body()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                # One call a connection: none is left open in a client's pool when the
                # fake stops (a test's process would find it unclosed).
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _faults(prompt: str, count: int, retry_delay: str) -> None:
    if "[429-once]" in prompt and count == 1:
        raise Refused(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaMetric": "generativelanguage.googleapis.com/requests"}],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
            ],
        )
    if "[503-once]" in prompt and count == 1:
        raise Refused(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def _gemini_prompt(body: dict[str, Any]) -> str:
    """The request's prompt (its text parts), its shape checked."""
    for name in body:
        if name not in _GEMINI_FIELDS:
            raise unknown(name, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    texts = []
    for content in contents:
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list) or not parts:
            raise invalid("* GenerateContentRequest.contents[0].parts: contains no parts")
        for part in parts:
            if not isinstance(part, dict) or len(part) != 1:
                raise invalid("* GenerateContentRequest.contents[0].parts: one data field a part")
            if "text" in part:
                texts.append(str(part["text"]))
            elif "inlineData" in part:
                inline = part["inlineData"]
                if not isinstance(inline, dict) or set(inline) != {"mimeType", "data"}:
                    raise invalid("* inlineData: mimeType and data are required")
                _image(str(inline["mimeType"]), inline["data"])
            else:
                raise unknown(next(iter(part)), "contents[0].parts[0]")
    if not texts:
        raise invalid("* GenerateContentRequest.contents: no text")
    return " ".join(texts)


def _gemini_config(model: str, body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The aspect ratio and image size asked for, the generationConfig checked."""
    config = body.get("generationConfig") or {}
    for name in config:
        if name not in _CONFIG_FIELDS:
            raise unknown(name, "generation_config")
    if "IMAGE" not in (config.get("responseModalities") or []):
        raise invalid("Model answers images only with responseModalities IMAGE.")
    seed = config.get("seed")
    if seed is not None and (not isinstance(seed, int) or not -(2**31) <= seed < 2**31):
        raise invalid("* GenerateContentRequest.generation_config.seed: not an int32")
    image_config = config.get("imageConfig") or {}
    for name in image_config:
        if name not in ("aspectRatio", "imageSize"):
            raise unknown(name, "generation_config.image_config")
    ratio, size = image_config.get("aspectRatio"), image_config.get("imageSize")
    if ratio is not None and ratio not in GEMINI_RATIOS:
        raise invalid(f"Unsupported aspect ratio: {ratio}")
    if size is not None and (size not in SCALE or model.startswith("gemini-2.5")):
        raise invalid(f"Unsupported image size: {size}")
    return ratio, size


def _gemini(model: str, body: dict[str, Any], prompt: str) -> dict[str, Any]:
    ratio, size = _gemini_config(model, body)
    inputs = sum(
        1 for c in body["contents"] for p in c["parts"] if "inlineData" in p
    )  # 258 tokens each
    words = len(prompt.split())
    usage: dict[str, Any] = {
        "promptTokenCount": words + 258 * inputs,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": words}]
        + ([{"modality": "IMAGE", "tokenCount": 258 * inputs}] if inputs else []),
    }
    if "[blocked]" in prompt:
        return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage}
    parts: list[dict[str, Any]] = [{"text": "Here is the picture you asked for."}]
    finish = "STOP"
    if "[image-safety]" in prompt:
        parts, finish = [], "IMAGE_SAFETY"
    elif "[text-only]" not in prompt:
        picture = png(pixels(ratio, size), len(prompt))
        image = {
            "inlineData": {"mimeType": "image/png", "data": base64.b64encode(picture).decode()}
        }
        if "[thoughts]" in prompt:  # an interim picture, marked as a thought
            parts.insert(0, {**image, "thought": True})
        parts.append(image)
    image_tokens = IMAGE_TOKENS * sum(
        1 for p in parts if "inlineData" in p and not p.get("thought")
    )
    usage["candidatesTokenCount"] = image_tokens + 8
    usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": 8}] + (
        [{"modality": "IMAGE", "tokenCount": image_tokens}] if image_tokens else []
    )
    usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]
    candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model}


def _imagen_prompt(body: dict[str, Any]) -> str:
    for name in body:
        if name not in ("instances", "parameters"):
            raise unknown(name, "")
    instances = body.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise invalid("Exactly one instance is required.")
    prompt = instances[0].get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("The prompt is required.")
    return prompt


def _imagen(model: str, body: dict[str, Any], prompt: str) -> dict[str, Any]:
    parameters = body.get("parameters") or {}
    for name in parameters:
        if name not in _IMAGEN_PARAMETERS:
            raise unknown(name, "parameters")
    count = parameters.get("sampleCount", 4)
    most = 1 if "ultra" in model else 4
    if not isinstance(count, int) or not 1 <= count <= most:
        raise invalid(f"sampleCount must be between 1 and {most}.")
    ratio, size = parameters.get("aspectRatio"), parameters.get("sampleImageSize")
    if ratio is not None and ratio not in IMAGEN_RATIOS:
        raise invalid(f"Unsupported aspect ratio: {ratio}")
    if size is not None and (size not in ("1K", "2K") or "fast" in model):
        raise invalid(f"Unsupported sample image size: {size}")
    if "[blocked]" in prompt:
        raise invalid(RESPONSIBLE_AI)
    filtered = count if "[image-safety]" in prompt else 1 if "[filter-one]" in prompt else 0
    predictions: list[dict[str, Any]] = []
    for i in range(count - filtered):
        picture = png(pixels(ratio, size), i * 40)
        predictions.append(
            {"mimeType": "image/png", "bytesBase64Encoded": base64.b64encode(picture).decode()}
        )
    if filtered and parameters.get("includeRaiReason"):
        predictions += [{"raiFilteredReason": RAI_REASON}] * filtered
    return {"predictions": predictions} if predictions else {}
