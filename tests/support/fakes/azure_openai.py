"""A fake Azure OpenAI resource serving image deployments over HTTP on 127.0.0.1.

It follows Azure's documents:

- "How to use Azure OpenAI image generation models"
  (https://learn.microsoft.com/azure/ai-foundry/openai/how-to/dall-e): ``POST
  /openai/deployments/{deployment}/images/generations?api-version=...`` (JSON) and
  ``.../images/edits`` (multipart: ``image``/``image[]``, ``mask``; gpt-image-1,
  API versions from 2025-04-01-preview); the ``api-key`` header; dall-e-3 takes
  ``n: 1`` only and sizes 1024x1024, 1792x1024, 1024x1792, answers ``url`` (the
  default) or ``b64_json`` with ``revised_prompt``; gpt-image-1 takes 1024x1024,
  1024x1536, 1536x1024, refuses ``response_format`` and answers ``b64_json`` with
  ``usage``; a flagged prompt or output answers ``error.code: contentFilter``.
- The REST reference (https://learn.microsoft.com/azure/ai-foundry/openai/reference;
  Azure/azure-rest-api-specs, .../AzureOpenAI/inference/stable/2024-10-21):
  ``prompt_filter_results`` and ``content_filter_results`` on each image, and the
  ``dalleErrorResponse`` of a refused prompt: ``error.code
  content_policy_violation``, ``inner_error.code ResponsibleAIPolicyViolation``
  with its ``content_filter_results`` and ``revised_prompt``.
- Microsoft Entra ID auth: ``Authorization: Bearer <token>`` instead of the key;
  401 ``{"error": {"code": "401", "message": "Access denied due to invalid
  subscription key or wrong API endpoint..."}}`` without either; 404 ``Resource not
  found`` for a path or api-version it does not serve, ``DeploymentNotFound`` for a
  deployment it does not have; 429 with ``retry-after-ms`` and ``Retry-After``.

Markers in the prompt: ``[content-filter]`` (the prompt refused), ``[output-filter]``
(the image filtered), ``[429-once]`` (429 on a prompt's first call), ``[500-once]``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import uuid
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from tests.support.fake_upstream import _Server

EXPECTED_KEY = "azure-test-key"
EXPECTED_TOKEN = "entra-test-token"
# Deployment name -> the model it serves.
DEPLOYMENTS = {"dalle3": "dall-e-3", "gpt-image": "gpt-image-1"}
SIZES = {
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "gpt-image-1": ("1024x1024", "1024x1536", "1536x1024"),
}
API_VERSIONS = ("2024-02-01", "2024-10-21", "2025-04-01-preview")
EDITS_SINCE = "2025-04-01-preview"
_PATH = re.compile(r"^/openai/deployments/([^/]+)/images/(generations|edits)$")
_SAFE = {"filtered": False, "severity": "safe"}


class FakeAzureOpenAI:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _AzureHandler)
        self.server.fake = self  # type: ignore[attr-defined]  # read by the handler
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeAzureOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_for(self, marker: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if marker in str(c["body"].get("prompt", ""))]


class _AzureHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: Any, ctype: str = "application/json", **headers: str
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("apim-request-id", uuid.uuid4().hex)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, **extra: Any) -> None:
        self._send(status, {"error": {"code": code, "message": message, **extra}})

    def do_GET(self) -> None:
        data = self.fake.files.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            return self._error(404, "404", "Resource not found")
        self._send(200, data, "image/png")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        url = urlsplit(self.path)
        version = parse_qs(url.query).get("api-version", [""])[0]
        match = _PATH.match(url.path)
        if match is None or version not in API_VERSIONS:
            return self._error(404, "404", "Resource not found")
        deployment, operation = match.groups()
        ctype = self.headers.get("Content-Type", "")
        body = _form(ctype, raw) if ctype.startswith("multipart/") else json.loads(raw)
        prompt = str(body.get("prompt", ""))
        with self.fake.lock:
            self.fake.counts[prompt] += 1
            count = self.fake.counts[prompt]
            self.fake.calls.append(
                {
                    "path": url.path,
                    "api_version": version,
                    "body": body,
                    "api_key": self.headers.get("api-key"),
                    "authorization": self.headers.get("Authorization"),
                }
            )
        if (
            self.headers.get("api-key") != EXPECTED_KEY
            and self.headers.get("Authorization") != f"Bearer {EXPECTED_TOKEN}"
        ):
            return self._error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. "
                "Make sure to provide a valid key for an active subscription and use a "
                "correct regional API endpoint for your resource.",
            )
        model = DEPLOYMENTS.get(deployment)
        if model is None:
            return self._error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist.",
            )
        if operation == "edits":
            if version < EDITS_SINCE:
                return self._error(404, "404", "Resource not found")
            if model != "gpt-image-1" or not body["_files"].get("image", 0) + body["_files"].get(
                "image[]", 0
            ):
                return self._error(
                    400,
                    "OperationNotSupported",
                    "The images edit operation needs a gpt-image-1 deployment and an image.",
                )
        elif not ctype.startswith("application/json"):
            return self._error(400, "BadRequest", "Content-Type must be application/json")
        refused = self._refused(body, model, prompt, count, version)
        if refused:
            return None
        return self._answer(body, model, prompt)

    def _refused(
        self, body: dict[str, Any], model: str, prompt: str, count: int, version: str
    ) -> bool:
        n = int(body.get("n") or 1)
        size = str(body.get("size") or "1024x1024")
        if not prompt:
            self._error(400, "invalid_value", "'prompt' is required", param="prompt")
        elif model == "dall-e-3" and n != 1:
            self._error(400, "invalid_value", "You must provide n=1 for this model.")
        elif size not in SIZES[model]:
            self._error(400, "invalid_value", f"Invalid size '{size}'.", param="size")
        elif model == "gpt-image-1" and "response_format" in body:
            self._error(400, "unknown_parameter", "Unknown parameter: 'response_format'.")
        elif "[429-once]" in prompt and count == 1:
            self._error(
                429,
                "429",
                f"Requests to the Images_Generations Operation under Azure OpenAI API "
                f"version {version} have exceeded call rate limit of your current "
                "OpenAI S0 pricing tier. Please retry after 1 second.",
            )
        elif "[500-once]" in prompt and count == 1:
            self._error(500, "InternalServerError", "The server had an error.")
        elif "[content-filter]" in prompt:
            results = {**dict.fromkeys(("hate", "self_harm", "sexual"), _SAFE)}
            results["violence"] = {"filtered": True, "severity": "high"}
            self._error(
                400,
                "content_policy_violation",
                "Your request was rejected as a result of our safety system. Your "
                "prompt may contain text that is not allowed by our safety system.",
                type="invalid_request_error",
                inner_error={
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_results": results,
                    "revised_prompt": prompt,
                },
            )
        elif "[output-filter]" in prompt:
            self._send(
                400,
                {
                    "created": int(time.time()),
                    "error": {
                        "code": "contentFilter",
                        "message": "Generated image was filtered as a result of our safety system.",
                    },
                },
            )
        else:
            return False
        return True

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        if code == 429:  # Azure's rate-limit headers
            self.send_header("retry-after-ms", "200")
            self.send_header("Retry-After", "1")

    def _answer(self, body: dict[str, Any], model: str, prompt: str) -> None:
        width, height = (int(v) for v in str(body.get("size") or "1024x1024").split("x"))
        data = []
        for i in range(int(body.get("n") or 1)):
            buf = io.BytesIO()
            Image.new("RGB", (width, height), (i * 40 % 256, 90, 150)).save(buf, "PNG")
            item: dict[str, Any] = {}
            if model == "dall-e-3":
                item["revised_prompt"] = f"revised: {prompt}"
                item["prompt_filter_results"] = {
                    **dict.fromkeys(("hate", "self_harm", "sexual", "violence"), _SAFE),
                    "profanity": {"detected": False, "filtered": False},
                }
                item["content_filter_results"] = dict.fromkeys(
                    ("hate", "self_harm", "sexual", "violence"), _SAFE
                )
            if model == "dall-e-3" and body.get("response_format", "url") == "url":
                name = f"{uuid.uuid4().hex}.png"
                self.fake.files[name] = buf.getvalue()
                item["url"] = f"http://127.0.0.1:{self.fake.port}/private/images/{name}"
            else:
                item["b64_json"] = base64.b64encode(buf.getvalue()).decode()
            data.append(item)
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model == "gpt-image-1":
            answer["usage"] = {
                "input_tokens": 12,
                "output_tokens": 272 * len(data),
                "total_tokens": 12 + 272 * len(data),
                "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
            }
        self._send(200, answer)

    @property
    def fake(self) -> FakeAzureOpenAI:
        return self.server.fake  # type: ignore[attr-defined, no-any-return]


def _form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart form: its text fields, and its files counted by field (``_files``)
    and kept (``_bytes``)."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    body: dict[str, Any] = {"_files": {}, "_bytes": {}}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename() is not None:
            body["_files"][name] = body["_files"].get(name, 0) + 1
            body["_bytes"].setdefault(name, []).append(payload)
        else:
            body[name] = payload.decode()
    return body
