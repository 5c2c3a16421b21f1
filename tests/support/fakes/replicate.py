"""A fake Replicate HTTP API (predictions) over HTTP on 127.0.0.1.

It follows Replicate's HTTP API reference (https://replicate.com/docs/reference/http)
and its guide to creating predictions
(https://replicate.com/docs/topics/predictions/create-a-prediction):

- ``POST /v1/models/{owner}/{name}/predictions`` (an official model) and ``POST
  /v1/predictions`` with ``version`` (a model version); the body ``{"input": {...}}``;
  ``Authorization: Bearer <token>`` on every API call (401 without it).
- ``Prefer: wait=N`` (1 to 60) holds the create up to N seconds: the fake answers at
  once, finished only when ``finish_when_waited`` is set (a fast model), else
  ``starting``, as Replicate does when the model is not done in time.
- A prediction: ``id``, ``model``, ``version``, ``input``, ``logs``, ``output`` (a
  list of file URLs, served by this same server as replicate.delivery serves them,
  without auth), ``data_removed``, ``error``, ``status`` (starting, processing,
  succeeded, failed, canceled), ``created_at``/``started_at``/``completed_at``,
  ``urls`` (``get``, ``cancel``, ``web``) and, once done, ``metrics``
  (``predict_time``, ``image_count``).
- ``GET /v1/predictions/{id}`` looks at one: it is ``starting`` when created and
  ``processing`` for the first ``polls - 1`` looks, done at look ``polls``.
- ``POST /v1/predictions/{id}/cancel`` cancels one not done (the prediction answered).
- Errors are RFC 7807 problem details ``{"title", "detail", "status"}``: 401
  Unauthenticated, 402 Insufficient credit, 404 Not found, 422 Input validation
  failed (with ``invalid_fields``), 429 Request was throttled (``Retry-After``).
- The input checked as FLUX's is: ``prompt`` (required), ``aspect_ratio`` among its
  ratios, ``num_outputs`` 1 to 4, ``seed`` an integer, ``output_format`` webp, jpg
  or png, ``width``/``height`` integers (models that take them; the picture's size
  where given, else the ratio's 1-megapixel size). Other inputs are dropped, as
  Replicate drops inputs a model does not define
  (https://github.com/replicate/cog/pull/2943).
- File inputs (https://replicate.com/docs/topics/predictions/input-files): a data
  URI (``data:image/...;base64,...``) or the URL of a file uploaded with ``POST
  /v1/files`` (https://sdks.replicate.com/resources/files/methods/create: multipart,
  the file in ``content`` with its filename and type; 201 with ``id``, ``name``,
  ``content_type``, ``size``, ``etag``, ``checksums``, ``metadata``, ``created_at``,
  ``expires_at`` and ``urls.get``, the URL a prediction takes). The models with file
  inputs are those of ``SCHEMAS``, as their Replicate schemas name them: FLUX
  Kontext's ``input_image``, FLUX Fill's ``image`` and ``mask`` (white: inpainted),
  FLUX Redux's ``redux_image`` (no prompt), nano-banana's ``image_input`` (a list);
  a file that is no image, or a required one missing, is a 422 naming the input. Its
  output is the input image (the first of a list), the mask's white pixels painted
  blue, at ``width``/``height`` or the ratio's size where given, else the input's
  (``match_input_image``).

Markers in the prompt: ``[nsfw]`` fails the prediction with FLUX's "NSFW content
detected" error, ``[sensitive]`` with Replicate's E005 "flagged as sensitive",
``[fail]`` with a model error, ``[hold]`` keeps it processing until canceled;
``[429-once]`` answers a prompt's first create 429
(``Retry-After: 1``); ``[402]`` answers 402.

``creates`` counts the predictions asked for (every create request that reached
the model), ``looks`` the GETs of each, ``canceled`` the ids a cancel reached,
``uploads`` the files uploaded.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
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

EXPECTED_TOKEN = "r8_fake_replicate_token"
RATIOS = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
FORMATS = ("webp", "jpg", "png")
# The image models that take files, by their Replicate schemas.
SCHEMAS = {
    "black-forest-labs/flux-kontext-pro": Schema(("input_image",), required=("input_image",)),
    "black-forest-labs/flux-fill-pro": Schema(("image", "mask"), required=("image",), mask="mask"),
    "black-forest-labs/flux-redux-dev": Schema(
        ("redux_image",), required=("redux_image",), prompt=False
    ),
    "google/nano-banana": Schema(lists=("image_input",)),
}
CREATE = re.compile(r"^/v1/models/([\w.-]+)/([\w.-]+)/predictions$")
PREDICTION = re.compile(r"^/v1/predictions/([\w-]+)(/cancel)?$")
NSFW = "NSFW content detected. Try running it again, or try a different prompt."
SENSITIVE = (
    "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"title": title, "detail": detail, "status": status, **extra}


def check_input(body: Any, schema: Schema, file: Callable[[Any], Image.Image | None]) -> str | None:
    """Why the create's input is invalid (a 422's detail), or None; ``file`` opens a
    file input (None: not a file)."""
    model_input = body.get("input") if isinstance(body, dict) else None
    if not isinstance(model_input, dict):
        return "- input: Invalid type. Expected: object"
    prompt = model_input.get("prompt")
    if schema.prompt and (not isinstance(prompt, str) or not prompt):
        return "- input: prompt is required"
    wrong = schema.problem(model_input, file)
    if wrong is not None:
        name, why = wrong
        return f"- input: {name} is required" if why == "missing" else f"- input.{name}: {why}"
    checks: dict[str, Callable[[Any], bool]] = {
        "aspect_ratio": lambda v: v in RATIOS,
        "num_outputs": lambda v: isinstance(v, int) and 1 <= v <= 4,
        "seed": lambda v: isinstance(v, int),
        "output_format": lambda v: v in FORMATS,
        "width": lambda v: isinstance(v, int) and 16 <= v <= 2048,
        "height": lambda v: isinstance(v, int) and 16 <= v <= 2048,
    }
    for name, good in checks.items():
        if name in model_input and not good(model_input[name]):
            return f"- input.{name}: Does not match the schema: {model_input[name]!r}"
    return None


class FakeReplicate:
    def __init__(self, polls: int = 3, port: int = 0, seconds: float | None = None) -> None:
        self.polls = polls
        # Set: a prediction is done once it is this old, however often it is looked
        # at (a model taking that long; bench/bench_capacity.py --queue-provider).
        self.seconds = seconds
        self._born: dict[str, float] = {}
        self.finish_when_waited = False
        self.predictions: dict[str, dict[str, Any]] = {}
        self.creates: list[dict[str, Any]] = []  # path, body, prefer of each one made
        self.looks: Counter[str] = Counter()
        self.canceled: list[str] = []
        self.counts: Counter[str] = Counter()  # create requests per prompt
        self.uploads: dict[str, dict[str, Any]] = {}  # by id: the file and its bytes
        self.served = Served(self._handler(), port)
        self.base_url = f"{self.served.origin}/v1"

    @property
    def submits(self) -> int:
        return len(self.creates)

    def start(self) -> FakeReplicate:
        self.served.start_serving()
        return self

    def stop(self) -> None:
        self.served.stop()

    def creates_for(self, marker: str) -> list[dict[str, Any]]:
        with self.served.lock:
            return [c for c in self.creates if marker in c["body"]["input"].get("prompt", "")]

    def file(self, value: Any) -> Image.Image | None:
        """A file input opened: a data URI, or the URL of a file uploaded here."""
        if isinstance(value, str) and value.startswith(f"{self.base_url}/files/"):
            with self.served.lock:
                uploaded = self.uploads.get(value.rsplit("/", 1)[1])
            return opened(uploaded["data"]) if uploaded else None
        return opened(data_uri_file(value))

    def _upload(self, name: str, ctype: str, data: bytes) -> dict[str, Any]:
        file_id = uuid.uuid4().hex[:26]
        uploaded = {
            "id": file_id,
            "name": name,
            "content_type": ctype,
            "size": len(data),
            "etag": hashlib.md5(data).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(data).hexdigest(),
                "md5": hashlib.md5(data).hexdigest(),
            },
            "metadata": {},
            "created_at": _now(),
            "expires_at": None,
            "urls": {"get": f"{self.base_url}/files/{file_id}"},
        }
        with self.served.lock:
            self.uploads[file_id] = {**uploaded, "data": data}
        return uploaded

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        with self.served.lock:
            return dict(self.predictions[prediction_id])

    # --- the model -------------------------------------------------------------------

    def _create(self, model: str, version: str | None, body: dict[str, Any], prefer: str) -> Any:
        prediction_id = uuid.uuid4().hex[:26]
        url = f"{self.base_url}/predictions/{prediction_id}"
        prediction: dict[str, Any] = {
            "id": prediction_id,
            "model": model,
            "version": version or "hidden",
            "input": body["input"],
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": _now(),
            "urls": {
                "get": url,
                "cancel": f"{url}/cancel",
                "web": f"https://replicate.com/p/{prediction_id}",
            },
        }
        with self.served.lock:
            self.creates.append(
                {
                    "id": prediction_id,
                    "model": model,
                    "version": version,
                    "body": body,
                    "prefer": prefer,
                }
            )
            self.predictions[prediction_id] = prediction
            self._born[prediction_id] = time.monotonic()
        if prefer.startswith("wait") and self.finish_when_waited:
            self._finish(prediction_id)
        return self.prediction(prediction_id)

    def _look(self, prediction_id: str) -> dict[str, Any]:
        with self.served.lock:
            self.looks[prediction_id] += 1
            prediction = self.predictions[prediction_id]
            pending = prediction["status"] in ("starting", "processing")
            held = "[hold]" in prediction["input"].get("prompt", "")
            due = self.looks[prediction_id] >= self.polls and not held
            if self.seconds is not None:
                due = time.monotonic() - self._born[prediction_id] >= self.seconds
            if pending and not due:
                prediction["status"] = "processing"
                prediction.setdefault("started_at", _now())
        if pending and due:
            self._finish(prediction_id)
        return self.prediction(prediction_id)

    def _finish(self, prediction_id: str) -> None:
        """The prediction done: its images made, or failed as its prompt says."""
        with self.served.lock:
            prediction = self.predictions[prediction_id]
            model_input = prediction["input"]
            model = prediction["model"]
        prompt = model_input.get("prompt", "")
        error = (
            NSFW
            if "[nsfw]" in prompt
            else SENSITIVE
            if "[sensitive]" in prompt
            else "CUDA error: an illegal memory access was encountered"
            if "[fail]" in prompt
            else None
        )
        outputs = [] if error else self._images(model, model_input)
        with self.served.lock:
            prediction.update(
                status="failed" if error else "succeeded",
                error=error,
                output=None if error else outputs,
                completed_at=_now(),
                metrics={"predict_time": 0.01, "image_count": len(outputs)},
            )

    def _images(self, model: str, model_input: dict[str, Any]) -> list[str]:
        width, height = RATIOS[model_input.get("aspect_ratio", "1:1")]
        width, height = model_input.get("width", width), model_input.get("height", height)
        fmt = model_input.get("output_format", "webp")
        source, mask = SCHEMAS.get(model, Schema()).inputs(model_input, self.file)
        sized = "aspect_ratio" in model_input or "width" in model_input
        urls = []
        for index in range(model_input.get("num_outputs", 1)):
            name = f"{uuid.uuid4().hex}.{fmt}"
            if source is not None:  # an image model's edit of its input
                data = edited(source, mask, (width, height) if sized else None, fmt)
            else:
                data = picture(width, height, fmt, index)
            with self.served.lock:
                self.served.files[name] = (data, CONTENT_TYPES[fmt])
            urls.append(f"{self.served.origin}/files/{name}")
        return urls

    def _cancel(self, prediction_id: str) -> dict[str, Any]:
        with self.served.lock:
            self.canceled.append(prediction_id)
            prediction = self.predictions[prediction_id]
            if prediction["status"] in ("starting", "processing"):
                prediction.update(status="canceled", completed_at=_now())
        return self.prediction(prediction_id)

    # --- HTTP ------------------------------------------------------------------------

    def _handler(self) -> type[JsonHandler]:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        return Handler


class _Handler(JsonHandler):
    fake: FakeReplicate

    def do_GET(self) -> None:
        if self.path.startswith("/files/"):  # replicate.delivery: no auth
            data, ctype = self.fake.served.files.get(self.path[7:], (b"", ""))
            return self.send_bytes(200 if data else 404, data, ctype or "text/plain")
        if not self._authorized():
            return None
        match = PREDICTION.match(self.path)
        if not match or match.group(2) or match.group(1) not in self.fake.predictions:
            return self._not_found()
        return self.send_json(200, self.fake._look(match.group(1)))

    def do_POST(self) -> None:
        if self.path == "/v1/files":
            return self._upload()
        body = self.read_body()
        if not self._authorized():
            return None
        match = PREDICTION.match(self.path)
        if match and match.group(2):
            if match.group(1) not in self.fake.predictions:
                return self._not_found()
            return self.send_json(200, self.fake._cancel(match.group(1)))
        return self._create(body)

    def _create(self, body: Any) -> None:
        official = CREATE.match(self.path)
        version = body.get("version") if isinstance(body, dict) else None
        if official:
            model = f"{official.group(1)}/{official.group(2)}"
        elif self.path == "/v1/predictions" and isinstance(version, str) and version:
            model = "owner/versioned"
        else:
            return self._not_found()
        invalid = check_input(body, SCHEMAS.get(model, Schema()), self.fake.file)
        if invalid:
            return self.send_json(
                422, problem(422, "Input validation failed", invalid, invalid_fields=[])
            )
        if self._refused(body["input"].get("prompt", "")):
            return None
        prefer = self.headers.get("Prefer", "")
        return self.send_json(201, self.fake._create(model, version, body, prefer))

    def _upload(self) -> None:
        """``POST /v1/files``: the multipart form's ``content`` part kept as a file."""
        raw = self.read_raw()
        if not self._authorized():
            return None
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = BytesParser(policy=HTTP).parsebytes(head + raw)
        parts = list(form.iter_parts()) if form.is_multipart() else []
        content = next(
            (p for p in parts if p.get_param("name", header="content-disposition") == "content"),
            None,
        )
        data = content.get_payload(decode=True) if content is not None else None
        if content is None or not isinstance(data, bytes) or not content.get_filename():
            detail = "The request must include the file's content, with its filename."
            return self.send_json(400, problem(400, "Bad request", detail))
        uploaded = self.fake._upload(str(content.get_filename()), content.get_content_type(), data)
        return self.send_json(201, uploaded)

    def _refused(self, prompt: str) -> bool:
        with self.fake.served.lock:
            self.fake.counts[prompt] += 1
            count = self.fake.counts[prompt]
        if "[429-once]" in prompt and count == 1:
            detail = "Request was throttled. Your rate limit resets in ~1s."
            throttled = problem(429, "Request was throttled", detail)
            self.send_json(429, throttled, {"Retry-After": "1"})
            return True
        if "[402]" in prompt:
            detail = "You have insufficient credit to run this model."
            self.send_json(402, problem(402, "Insufficient credit", detail))
            return True
        return False

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {EXPECTED_TOKEN}":
            return True
        detail = "You did not pass a valid authentication token"
        self.send_json(401, problem(401, "Unauthenticated", detail))
        return False

    def _not_found(self) -> None:
        detail = "The requested resource could not be found."
        self.send_json(404, problem(404, "Not found", detail))
