"""A fake Stability AI REST API (v2beta Stable Image) over HTTP on 127.0.0.1.

It follows Stability's API reference (https://platform.stability.ai/docs/api-reference,
the OpenAPI document at https://api.stability.ai/v2beta/openapi.json):

- ``POST /v2beta/stable-image/generate/{core,ultra,sd3}`` and ``POST
  /v2beta/stable-image/edit/inpaint``; the body ``multipart/form-data`` (anything
  else is a 400); ``authorization: Bearer <key>`` (401 without it).
- Fields: ``prompt`` (required, 1 to 10,000 characters); ``aspect_ratio`` among
  21:9, 16:9, 3:2, 5:4, 1:1, 4:5, 2:3, 9:16, 9:21 (generate only); ``seed`` 0 to
  4294967294 (0 or none: random); ``output_format`` png, jpeg or webp (sd3: png or
  jpeg); sd3's ``model`` among the SD3 models; inpaint's ``image`` (required) and
  ``mask`` (optional). A bad field answers 400.
- ``accept: application/json`` answers ``{"image": base64, "finish_reason":
  "SUCCESS" | "CONTENT_FILTERED", "seed"}``; ``image/*`` (the default) the image's
  bytes with ``finish-reason`` and ``seed`` headers.
- Errors ``{"id", "name", "errors": [...]}``: 400 ``bad_request``, 401
  ``unauthorized``, 403 ``content_moderation`` ("Your request was flagged by our
  content moderation system"), 404, 422, 429 ("You have made more than 150 requests
  in 10 seconds"), 500 ``internal_error``.

Images come back at the fake's own resolution for the ratio (its longer side 128
pixels), as Stability draws each ratio at a resolution of its own.

Markers in the prompt: ``[moderation]`` (403 content_moderation), ``[filtered]`` (200
CONTENT_FILTERED, a blurred image), ``[429-once]`` (429 on a prompt's first call;
Stability documents no Retry-After header: ``retry_after`` sets one), ``[500-once]``,
``[422]``.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from tests.support.fake_upstream import _Server
from tests.support.fakes.azure_openai import _form

EXPECTED_KEY = "sk-stability-test"
RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
SD3_MODELS = (
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3-large",
    "sd3-large-turbo",
    "sd3-medium",
)
_PATH = re.compile(r"^/v2beta/stable-image/(generate/(core|ultra|sd3)|edit/inpaint)$")
_PIL = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def drawn_size(ratio: str) -> tuple[int, int]:
    """The fake's resolution for a ratio: its longer side 128 pixels."""
    w, h = (int(v) for v in ratio.split(":"))
    scale = 128 / max(w, h)
    return round(w * scale), round(h * scale)


class FakeStability:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.retry_after: str | None = None  # a Retry-After on 429s
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _StabilityHandler)
        self.server.fake = self  # type: ignore[attr-defined]  # read by the handler
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeStability:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_for(self, marker: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if marker in str(c["body"].get("prompt", ""))]


class _StabilityHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", uuid.uuid4().hex)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(
        self, status: int, name: str, *errors: str, headers: dict[str, str] | None = None
    ) -> None:
        body = {"id": uuid.uuid4().hex, "name": name, "errors": list(errors)}
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        match = _PATH.match(self.path)
        ctype = self.headers.get("Content-Type", "")
        body = _form(ctype, raw) if ctype.startswith("multipart/form-data") else {}
        prompt = str(body.get("prompt", ""))
        with self.fake.lock:
            self.fake.counts[prompt] += 1
            count = self.fake.counts[prompt]
            self.fake.calls.append(
                {
                    "path": self.path,
                    "body": body,
                    "authorization": self.headers.get("Authorization"),
                    "accept": self.headers.get("Accept"),
                }
            )
        if match is None:
            return self._error(404, "not_found", f"{self.path}: not found")
        if self.headers.get("Authorization") != f"Bearer {EXPECTED_KEY}":
            return self._error(
                401, "unauthorized", "authorization: invalid or missing header value"
            )
        if not ctype.startswith("multipart/form-data"):
            return self._error(400, "bad_request", "content-type: must be multipart/form-data")
        problem = _problem(body, match.group(2))
        if problem:
            return self._error(400, "bad_request", problem)
        if "[429-once]" in prompt and count == 1:
            return self._error(
                429,
                "rate_limit_exceeded",
                "You have exceeded the rate limit of 150 requests within a 10 second "
                "period, and have been timed out for 60 seconds.",
                headers={"Retry-After": self.fake.retry_after} if self.fake.retry_after else None,
            )
        if "[500-once]" in prompt and count == 1:
            return self._error(500, "internal_error", "An unexpected server error has occurred.")
        if "[422]" in prompt:
            return self._error(422, "invalid_language", "English is the only supported language.")
        if "[moderation]" in prompt:
            return self._error(
                403,
                "content_moderation",
                "Your request was flagged by our content moderation system, as a result "
                "your request was denied and you were not charged.",
            )
        self._answer(body, prompt, match.group(2) is None)

    def _answer(self, body: dict[str, Any], prompt: str, inpaint: bool) -> None:
        seed = int(body.get("seed") or 0) or random.randint(1, 4294967294)
        fmt = str(body.get("output_format") or "png")
        if inpaint:
            source = Image.open(io.BytesIO(body["_bytes"]["image"][0]))
            size = source.size
        else:
            size = drawn_size(str(body.get("aspect_ratio") or "1:1"))
        filtered = "[filtered]" in prompt
        color = (128, 128, 128) if filtered else (seed % 256, 60, 200)
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, _PIL[fmt])
        reason = "CONTENT_FILTERED" if filtered else "SUCCESS"
        if self.headers.get("Accept") == "application/json":
            answer = {
                "image": base64.b64encode(buf.getvalue()).decode(),
                "finish_reason": reason,
                "seed": seed,
            }
            ctype = f"application/json; type=image/{fmt}"
            return self._send(200, json.dumps(answer).encode(), ctype)
        headers = {"finish-reason": reason, "seed": str(seed)}
        self._send(200, buf.getvalue(), f"image/{fmt}", headers)

    @property
    def fake(self) -> FakeStability:
        return self.server.fake  # type: ignore[attr-defined, no-any-return]


def _problem(body: dict[str, Any], endpoint: str | None) -> str | None:
    """What is wrong with a request's fields, as Stability's ``errors`` word it."""
    prompt = body.get("prompt")
    if not prompt:
        return "prompt: is required"
    if len(prompt) > 10000:
        return "prompt: must be at most 10000 characters"
    formats = ("png", "jpeg") if endpoint == "sd3" else ("png", "jpeg", "webp")
    if body.get("output_format", "png") not in formats:
        return f"output_format: must be one of {', '.join(formats)}"
    seed = body.get("seed", "0")
    if not seed.isdigit() or int(seed) > 4294967294:
        return "seed: must be an integer from 0 to 4294967294"
    if endpoint is None:
        if "image" not in body["_files"]:
            return "image: is required"
        if "aspect_ratio" in body:
            return "aspect_ratio: is not a parameter of inpaint"
        return None
    if body.get("aspect_ratio", "1:1") not in RATIOS:
        return f"aspect_ratio: must be one of {', '.join(RATIOS)}"
    if "model" in body and (endpoint != "sd3" or body["model"] not in SD3_MODELS):
        return f"model: must be one of {', '.join(SD3_MODELS)}"
    return None
