"""A fake fal queue API over HTTP on 127.0.0.1.

It follows fal's queue reference (https://docs.fal.ai/model-apis/model-endpoints/queue,
https://fal.ai/docs/inference-api/queue/cancel), its error references
(https://docs.fal.ai/model-apis/errors, https://fal.ai/docs/documentation/model-apis/request-errors)
and FLUX.1 [dev]'s schema (https://fal.ai/models/fal-ai/flux/dev/api):

- ``POST /{app_id}`` (such as ``/fal-ai/flux/dev``) queues a request; ``Authorization:
  Key <key>`` on every queue call (401 without it). It answers ``{"request_id",
  "response_url", "status_url", "cancel_url", "queue_position"}``, the URLs under
  the app without its subpath (``/fal-ai/flux/requests/{id}``), as fal's do.
- ``GET .../requests/{id}/status``: ``{"status": "IN_QUEUE", "queue_position"}`` on
  the first look, ``IN_PROGRESS`` until look ``polls``, then ``COMPLETED`` (with
  ``metrics.inference_time``).
- ``GET .../requests/{id}``: the result, ``{"images": [{"url", "content_type",
  "width", "height"}], "timings", "seed", "has_nsfw_concepts", "prompt"}`` (the
  images served by this same server, as fal's CDN serves them, without auth); a
  request not completed answers 400 ``{"detail": "Request is still in progress"}``.
- ``PUT .../requests/{id}/cancel``: 202 ``{"status": "CANCELLATION_REQUESTED"}``, 400
  ``ALREADY_COMPLETED``, 404 ``NOT_FOUND``; a canceled request completes with a 499
  ``client_cancelled`` request error.
- The input as FLUX.1 [dev] takes it: ``prompt`` (required), ``image_size`` (a preset
  name or ``{"width", "height"}``), ``num_images`` 1 to 4, ``seed``,
  ``output_format`` jpeg or png, ``enable_safety_checker``; a bad one is a 422 with
  the model error shape ``{"detail": [{"loc", "msg", "type", "url"}]}``.
- File inputs: a data URI (``data:image/...;base64,...``: "Models also accept
  base64-encoded data URIs", https://docs.fal.ai/documentation/model-apis/fal-cdn).
  The apps with file inputs are those of ``SCHEMAS``, as their schemas name them:
  FLUX Kontext's ``image_url``, FLUX Fill's ``image_url`` and ``mask_url`` (white:
  filled), FLUX Redux's ``image_url`` (no prompt), nano-banana edit's
  ``image_urls`` (a list); a missing one is a 422 ``missing``, one that is no
  readable image a 422 ``image_load_error`` (fal's model error for an image it
  cannot load). The result's image is the input image (the first of a list), the
  mask's white pixels painted blue, at ``image_size`` where given, else the
  input's size.

Markers in the prompt: ``[policy]`` completes the request with a 422
``content_policy_violation`` model error, ``[nsfw]`` completes it with its images
black and ``has_nsfw_concepts`` true (the safety checker's answer), ``[fail]`` with a
500 ``runner_server_error`` request error (``X-Fal-Error-Type``), ``[hold]`` keeps it
in the queue until canceled, ``[429-once]``
answers a prompt's first submit 429 (fal's references name no ``Retry-After``; the
fake sends ``Retry-After: 1``, honoured where sent, as fal's own clients back off).

``submitted`` holds every request queued, ``looks`` the status looks of each,
``canceled`` the ids a cancel reached.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from PIL import Image

from tests.support.fakes.queue_http import (
    CONTENT_TYPES,
    JsonHandler,
    Schema,
    Served,
    data_uri_file,
    edited,
    opened,
    picture,
)

EXPECTED_KEY = "fal-fake-key"
PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
REQUEST = re.compile(r"^/(.+)/requests/([\w-]+)(/status|/cancel)?$")
ERRORS_URL = "https://docs.fal.ai/errors"
# The apps that take files, by their schemas.
SCHEMAS = {
    "fal-ai/flux-pro/kontext": Schema(("image_url",), required=("image_url",)),
    "fal-ai/flux-pro/v1/fill": Schema(
        ("image_url", "mask_url"), required=("image_url", "mask_url"), mask="mask_url"
    ),
    "fal-ai/flux/dev/redux": Schema(("image_url",), required=("image_url",), prompt=False),
    "fal-ai/nano-banana/edit": Schema(lists=("image_urls",), required=("image_urls",)),
}


def model_error(field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"detail": [{"loc": ["body", field], "msg": msg, "type": kind, "url": ERRORS_URL}]}


def _size_ok(value: Any) -> bool:
    if isinstance(value, str):
        return value in PRESETS
    return isinstance(value, dict) and all(
        isinstance(value.get(k), int) and 16 <= value[k] <= 14142 for k in ("width", "height")
    )


def file(value: Any) -> Image.Image | None:
    """A file input opened (a data URI), or None."""
    return opened(data_uri_file(value))


def check_input(body: Any, schema: Schema) -> dict[str, Any] | None:
    """The 422 body a bad input gets, or None."""
    if not isinstance(body, dict):
        return model_error("body", "Input should be a valid dictionary", "dict_type")
    prompt = body.get("prompt")
    if schema.prompt and (not isinstance(prompt, str) or not prompt):
        return model_error("prompt", "Field required", "missing")
    wrong = schema.problem(body, file)
    if wrong is not None:
        name, why = wrong
        if why == "missing":
            return model_error(name, "Field required", "missing")
        msg = "Failed to load the image. Please ensure the image file is not corrupted."
        return model_error(name, msg, "image_load_error")
    checks: dict[str, Callable[[Any], bool]] = {
        "image_size": _size_ok,
        "num_images": lambda v: isinstance(v, int) and 1 <= v <= 4,
        "seed": lambda v: isinstance(v, int),
        "output_format": lambda v: v in ("jpeg", "png"),
        "enable_safety_checker": lambda v: isinstance(v, bool),
    }
    for name, good in checks.items():
        if name in body and not good(body[name]):
            return model_error(name, f"Input is not valid: {body[name]!r}", "value_error")
    return None


def request_root(app_id: str) -> str:
    parts = app_id.split("/")
    return "/".join(parts[:3] if parts[0] in ("workflows", "comfy") else parts[:2])


class FakeFal:
    def __init__(self, polls: int = 3, port: int = 0) -> None:
        self.polls = polls
        self.requests: dict[str, dict[str, Any]] = {}
        self.submitted: list[dict[str, Any]] = []  # app and body of each one queued
        self.looks: Counter[str] = Counter()
        self.canceled: list[str] = []
        self.counts: Counter[str] = Counter()  # submits per prompt
        self.served = Served(self._handler(), port)
        self.base_url = self.served.origin

    @property
    def submits(self) -> int:
        return len(self.submitted)

    def submitted_for(self, marker: str) -> list[dict[str, Any]]:
        with self.served.lock:
            return [s for s in self.submitted if marker in s["body"].get("prompt", "")]

    def start(self) -> FakeFal:
        self.served.start_serving()
        return self

    def stop(self) -> None:
        self.served.stop()

    # --- the queue -------------------------------------------------------------------

    def _queue(self, app: str, body: dict[str, Any]) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        root = f"{self.base_url}/{request_root(app)}/requests/{request_id}"
        with self.served.lock:
            self.submitted.append({"app": app, "body": body})
            self.requests[request_id] = {
                "root": request_root(app),
                "app": app,
                "body": body,
                "status": "IN_QUEUE",
                "result": None,
            }
        return {
            "request_id": request_id,
            "response_url": root,
            "status_url": f"{root}/status",
            "cancel_url": f"{root}/cancel",
            "queue_position": 0,
        }

    def _status(self, request_id: str) -> dict[str, Any]:
        with self.served.lock:
            self.looks[request_id] += 1
            request = self.requests[request_id]
            if request["status"] != "COMPLETED":
                held = "[hold]" in request["body"].get("prompt", "")
                looks = 1 if held else self.looks[request_id]
                request["status"] = (
                    "COMPLETED"
                    if looks >= self.polls
                    else "IN_QUEUE"
                    if looks == 1
                    else "IN_PROGRESS"
                )
            status = request["status"]
        if status == "COMPLETED" and request["result"] is None:
            request["result"] = self._run(request["app"], request["body"])
        state: dict[str, Any] = {"status": status}
        if status == "IN_QUEUE":
            state["queue_position"] = 1
        if status == "COMPLETED":
            state["metrics"] = {"inference_time": 0.01}
        return state

    def _run(self, app: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The request's answer once done: status, body, headers."""
        prompt = body.get("prompt", "")
        if "[policy]" in prompt:
            msg = "The content was flagged by a content checker."
            return 422, model_error("prompt", msg, "content_policy_violation"), {}
        if "[fail]" in prompt:
            failed = {
                "detail": "The runner encountered an internal server error.",
                "error_type": "runner_server_error",
            }
            return 500, failed, {"X-Fal-Error-Type": "runner_server_error"}
        size = body.get("image_size", "landscape_4_3")
        width, height = PRESETS[size] if isinstance(size, str) else (size["width"], size["height"])
        fmt = body.get("output_format", "jpeg")
        nsfw = "[nsfw]" in prompt and body.get("enable_safety_checker", True)
        source, mask = SCHEMAS.get(app, Schema()).inputs(body, file)
        if source is not None and "image_size" not in body:
            width, height = source.size
        images = []
        for index in range(body.get("num_images", 1)):
            name = f"{uuid.uuid4().hex}.{fmt}"
            if source is not None and not nsfw:  # an image model's edit of its input
                data = edited(source, mask, (width, height), fmt)
            else:
                data = picture(width, height, fmt, index, nsfw)
            with self.served.lock:
                self.served.files[name] = (data, CONTENT_TYPES[fmt])
            images.append(
                {
                    "url": f"{self.base_url}/files/{name}",
                    "content_type": CONTENT_TYPES[fmt],
                    "width": width,
                    "height": height,
                }
            )
        result = {
            "images": images,
            "timings": {"inference": 0.01},
            "seed": body.get("seed", random.randrange(2**32)),
            "has_nsfw_concepts": [bool(nsfw)] * len(images),
            "prompt": prompt,
        }
        return 200, result, {}

    def _cancel(self, request_id: str) -> tuple[int, dict[str, Any]]:
        with self.served.lock:
            self.canceled.append(request_id)
            request = self.requests[request_id]
            if request["status"] == "COMPLETED":
                return 400, {"status": "ALREADY_COMPLETED"}
            cancelled = {
                "detail": "The request was cancelled by the client.",
                "error_type": "client_cancelled",
            }
            request.update(
                status="COMPLETED",
                result=(499, cancelled, {"X-Fal-Error-Type": "client_cancelled"}),
            )
        return 202, {"status": "CANCELLATION_REQUESTED"}

    # --- HTTP ------------------------------------------------------------------------

    def _handler(self) -> type[JsonHandler]:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        return Handler


class _Handler(JsonHandler):
    fake: FakeFal

    def do_GET(self) -> None:
        if self.path.startswith("/files/"):  # fal's CDN: no auth
            data, ctype = self.fake.served.files.get(self.path[7:], (b"", ""))
            return self.send_bytes(200 if data else 404, data, ctype or "text/plain")
        request_id, suffix = self._request()
        if request_id is None or suffix == "/cancel":
            return None
        if suffix == "/status":
            return self.send_json(200, self.fake._status(request_id))
        request = self.fake.requests[request_id]
        if request["result"] is None:
            return self.send_json(400, {"detail": "Request is still in progress"})
        status, body, headers = request["result"]
        return self.send_json(status, body, headers)

    def do_PUT(self) -> None:
        request_id, suffix = self._request()
        if request_id is None:
            return None
        if suffix != "/cancel":
            return self.send_json(405, {"detail": "Method Not Allowed"})
        status, body = self.fake._cancel(request_id)
        return self.send_json(status, body)

    def do_POST(self) -> None:
        body = self.read_body()
        if not self._authorized():
            return None
        app = self.path.strip("/")
        if "/requests/" in self.path or "/" not in app:
            return self.send_json(404, {"detail": "Not Found"})
        invalid = check_input(body, SCHEMAS.get(app, Schema()))
        if invalid:
            return self.send_json(422, invalid)
        prompt = body.get("prompt", "")
        with self.fake.served.lock:
            self.fake.counts[prompt] += 1
            first = self.fake.counts[prompt] == 1
        if "[429-once]" in prompt and first:
            return self.send_json(429, {"detail": "Too many requests"}, {"Retry-After": "1"})
        return self.send_json(200, self.fake._queue(app, body))

    def _request(self) -> tuple[str | None, str | None]:
        """The request a queue path names, its auth checked (else answered)."""
        if not self._authorized():
            return None, None
        match = REQUEST.match(self.path.split("?")[0])
        known = match and self.fake.requests.get(match.group(2))
        if not match or not known or known["root"] != match.group(1):
            self.send_json(404, {"detail": "Request not found"})
            return None, None
        return match.group(2), match.group(3)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Key {EXPECTED_KEY}":
            return True
        self.send_json(401, {"detail": "No user found for Key ID and Secret"})
        return False
