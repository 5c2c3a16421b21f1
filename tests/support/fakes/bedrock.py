"""A fake Amazon Bedrock runtime speaking InvokeModel's REST binding over HTTP on
127.0.0.1, for boto3's ``bedrock-runtime`` client pointed at it (``endpoint_url``).

It follows:

- InvokeModel in the Bedrock runtime API reference and botocore's service model for
  ``bedrock-runtime`` (protocol ``rest-json``, signing name ``bedrock``):
  ``POST /model/{modelId}/invoke`` (the id percent-encoded), the model's JSON body,
  ``Content-Type`` and ``Accept`` ``application/json``; an error answers its HTTP
  status with the ``x-amzn-ErrorType`` header and a ``{"message": ...}`` body, as
  AWS's restJson1 protocol does, so botocore raises ClientError with that code.
  https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_InvokeModel.html
- Signature Version 4 (the canonical request, string to sign and signing key): every
  call's ``Authorization: AWS4-HMAC-SHA256 Credential=.../{date}/{region}/bedrock/
  aws4_request, SignedHeaders=..., Signature=...`` is recomputed here from the test's
  fake credentials; a wrong one answers 403 InvalidSignatureException, an unknown
  key 403 UnrecognizedClientException, no header 403 MissingAuthenticationTokenException.
  https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html
- Amazon Nova Canvas and Titan Image Generator bodies (``taskType`` TEXT_IMAGE,
  INPAINTING, IMAGE_VARIATION with ``imageGenerationConfig``), answered
  ``{"images": [...]}``; a content-filtered prompt is a ValidationException "This
  request has been blocked by our content filters. ...", a filtered output a 200
  whose ``error`` is "All of the generated images have been blocked by our content
  filters." (Nova's "Error handling" page).
  https://docs.aws.amazon.com/nova/latest/userguide/image-gen-req-resp-structure.html
  https://docs.aws.amazon.com/nova/latest/userguide/image-gen-errors.html
  https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-titan-image.html
- Stability models on Bedrock: ``{"prompt", "aspect_ratio", "seed",
  "output_format", ...}`` answered ``{"seeds", "finish_reasons", "images"}``; a
  filtered prompt answers ``{"finish_reasons": ["Filter reason: prompt"]}``.
  https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-diffusion-stable-image-core-text-image-request-response.html

A body that is not its family's shape answers a ValidationException "Malformed input
request: ..." (Bedrock's words for a body its model's schema refuses).

Behaviour by markers in the prompt, counted per prompt: ``[throttle-once]`` a 429
ThrottlingException first, ``[500-once]`` an InternalServerException first,
``[content-filter]`` the prompt refused, ``[output-filter]`` the output refused,
``[denied]`` a 403 AccessDeniedException, ``[slow]`` an answer a second late.
``mode`` fails every call ("throttle", "500").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote

from PIL import Image

ACCESS_KEY = "AKIAFAKEBEDROCKTEST1"
SECRET_KEY = "fake-bedrock-secret-key-for-tests-only"
REGION = "us-east-1"

NOVA_MAX_SEED = 858_993_459
TITAN_MAX_SEED = 2_147_483_646
# Each task type and the field holding its parameters.
NOVA_TASKS = {
    "TEXT_IMAGE": "textToImageParams",
    "INPAINTING": "inPaintingParams",
    "IMAGE_VARIATION": "imageVariationParams",
}
CONFIG_FIELDS = {"numberOfImages", "width", "height", "quality", "cfgScale", "seed"}
STABILITY_FIELDS = {"prompt", "aspect_ratio", "seed", "output_format", "negative_prompt", "mode"}
STABILITY_RATIOS = {
    "16:9": (1344, 768),
    "1:1": (1024, 1024),
    "21:9": (1536, 640),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[^,]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


class Malformed(Exception):
    """A body its model's schema refuses."""


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def expected_signature(
    method: str, raw_path: str, headers: dict[str, str], body: bytes, signed: str, scope: str
) -> str:
    """SigV4 recomputed from what came over the wire: the canonical request (the
    path's segments URI-encoded once more, as for every service but S3; the
    signed headers, lowercased, trimmed; the payload's SHA-256), the string to
    sign, then the key derived from the secret, date, region and service."""
    path, _, query = raw_path.partition("?")
    canonical_uri = quote(path, safe="/~")
    canonical_query = "&".join(sorted(query.split("&"))) if query else ""
    names = signed.split(";")
    lowered = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{n}:{' '.join(lowered.get(n, '').split())}\n" for n in names)
    canonical = "\n".join(
        [
            method,
            canonical_uri,
            canonical_query,
            canonical_headers,
            signed,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    amz_date = lowered.get("x-amz-date", "")
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    date, region, service, _ = scope.split("/")
    key = f"AWS4{SECRET_KEY}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class FakeBedrock:
    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.calls: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.mode: str | None = None  # "throttle" or "500": every call fails so
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.fake = self
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeBedrock:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_for(self, marker: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if marker in _prompt(c["body"])]

    def note(self, model_id: str, body: Any, headers: Any) -> tuple[str, int]:
        """Record a call; its prompt and how many times that prompt came."""
        prompt = _prompt(body)
        with self.lock:
            self.counts[prompt] += 1
            self.calls.append(
                {
                    "model": model_id,
                    "body": body,
                    "authorization": headers.get("Authorization"),
                    "content_type": headers.get("Content-Type"),
                    "accept": headers.get("Accept"),
                }
            )
            return prompt, self.counts[prompt]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeBedrock

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up


class Refusal(Exception):
    """An error answer: HTTP status, x-amzn-ErrorType, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def check_signature(fake: FakeBedrock, path: str, headers: Any, raw: bytes) -> None:
    """The Authorization header is SigV4 for the fake's key, region and service."""
    header = headers.get("Authorization")
    if not header:
        raise Refusal(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTH.match(header)
    if match is None:
        raise Refusal(400, "IncompleteSignatureException", "Authorization header is malformed")
    if match["key"] != ACCESS_KEY:
        raise Refusal(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    if match["region"] != fake.region or match["service"] != "bedrock":
        raise Refusal(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region ({fake.region}) and service 'bedrock'.",
        )
    signed = match["signed"]
    if not {"host", "x-amz-date"} <= set(signed.split(";")):
        raise Refusal(403, "InvalidSignatureException", "host and x-amz-date must be signed")
    scope = f"{match['date']}/{match['region']}/{match['service']}/aws4_request"
    wanted = expected_signature("POST", path, dict(headers.items()), raw, signed, scope)
    if not hmac.compare_digest(wanted, match["signature"]):
        raise Refusal(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you "
            "provided. Check your AWS Secret Access Key and signing method.",
        )


def check_call(fake: FakeBedrock, headers: Any, prompt: str, count: int) -> None:
    """The call's headers, then the faults the prompt's markers (or ``mode``) ask for."""
    if headers.get("Content-Type") != "application/json":
        raise Refusal(400, "ValidationException", "Content-Type must be application/json")
    if headers.get("Accept") not in (None, "application/json", "*/*"):
        raise Refusal(400, "ValidationException", "Accept must be application/json")
    if fake.mode == "throttle" or ("[throttle-once]" in prompt and count == 1):
        raise Refusal(
            429, "ThrottlingException", "Too many requests, please wait before trying again."
        )
    if fake.mode == "500" or ("[500-once]" in prompt and count == 1):
        raise Refusal(500, "InternalServerException", "Internal server error")
    if "[slow]" in prompt:  # past a short read timeout
        time.sleep(1.0)
    if "[denied]" in prompt:
        raise Refusal(
            403,
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], error: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
        if error is not None:
            # AWS appends its namespace; botocore keeps what precedes ':'.
            self.send_header(
                "x-amzn-ErrorType", f"{error}:http://internal.amazon.com/coral/com.amazon.bedrock/"
            )
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            self._send(200, self._answer(raw))
        except Refusal as refusal:
            self._send(refusal.status, {"message": refusal.message}, error=refusal.code)
        except Malformed as exc:
            message = f"Malformed input request: {exc}, please reformat your input and try again."
            self._send(400, {"message": message}, error="ValidationException")

    def _answer(self, raw: bytes) -> dict[str, Any]:
        fake = self.server.fake
        parts = self.path.partition("?")[0].split("/")
        if len(parts) != 4 or parts[1] != "model" or parts[3] != "invoke":
            raise Refusal(404, "UnknownOperationException", "Unknown operation")
        model_id = unquote(parts[2])
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        prompt, count = fake.note(model_id, body, self.headers)
        check_signature(fake, self.path, self.headers, raw)
        check_call(fake, self.headers, prompt, count)
        if "amazon.nova-canvas" in model_id:
            return nova_answer(body, prompt, NOVA_MAX_SEED)
        if "amazon.titan-image" in model_id:
            return nova_answer(body, prompt, TITAN_MAX_SEED)
        if "stability." in model_id:
            return stability_answer(body, prompt)
        raise Refusal(404, "ResourceNotFoundException", f"Could not resolve the model {model_id}")


def nova_answer(body: Any, prompt: str, max_seed: int) -> dict[str, Any]:
    width, height, n = _check_nova(body, max_seed)
    if "[content-filter]" in prompt:
        raise Refusal(
            400,
            "ValidationException",
            "This request has been blocked by our content filters. Please adjust your "
            "text prompt to submit a new request.",
        )
    if "[output-filter]" in prompt:
        return {
            "images": [],
            "error": "All of the generated images have been blocked by our content filters.",
        }
    seed = int(body["imageGenerationConfig"].get("seed", 12))
    colours = [((seed + i) % 256, 80, 160) for i in range(n)]
    return {"images": [base64.b64encode(png(width, height, c)).decode() for c in colours]}


def stability_answer(body: Any, prompt: str) -> dict[str, Any]:
    _check_stability(body)
    if "[content-filter]" in prompt:
        return {"finish_reasons": ["Filter reason: prompt"]}
    width, height = STABILITY_RATIOS[body.get("aspect_ratio", "1:1")]
    seed = int(body.get("seed", 0))
    buf = io.BytesIO()
    kind = "JPEG" if body.get("output_format") == "jpeg" else "PNG"
    Image.new("RGB", (width, height), (seed % 256, 40, 90)).save(buf, format=kind)
    return {
        "seeds": [seed],
        "finish_reasons": [None],
        "images": [base64.b64encode(buf.getvalue()).decode()],
    }


def _prompt(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for holder in ("textToImageParams", "inPaintingParams", "imageVariationParams"):
        if isinstance(body.get(holder), dict):
            return str(body[holder].get("text", ""))
    return str(body.get("prompt", ""))


def _check_nova(body: Any, max_seed: int) -> tuple[int, int, int]:
    """Nova's / Titan's body checked against its documented shape: the image's size
    and how many images are asked."""
    if not isinstance(body, dict):
        raise Malformed("#: expected type: JSONObject")
    extra = set(body) - {"taskType", "imageGenerationConfig", *NOVA_TASKS.values()}
    if extra:
        raise Malformed(f"#: extraneous key [{sorted(extra)[0]}] is not permitted")
    task = body.get("taskType")
    if task not in NOVA_TASKS:
        raise Malformed(f"#/taskType: {task} is not a valid enum value")
    params = body.get(NOVA_TASKS[task])
    if not isinstance(params, dict):
        raise Malformed(f"#: required key [{NOVA_TASKS[task]}] not found")
    n = _check_config(body.get("imageGenerationConfig"), max_seed, task == "TEXT_IMAGE")
    if task == "TEXT_IMAGE":
        width, height = _check_size(body["imageGenerationConfig"], max_seed)
        if not isinstance(params.get("text"), str):
            raise Malformed("#/textToImageParams: required key [text] not found")
        return width, height, n
    if task == "INPAINTING":
        picture = _check_inpainting(params)
    else:
        images = params.get("images")
        if not isinstance(images, list) or not 1 <= len(images) <= 5:
            raise Malformed("#/imageVariationParams/images: 1 to 5 images")
        picture = _image(images[0])
    return picture.width, picture.height, n


def _check_config(config: Any, max_seed: int, sized: bool) -> int:
    """imageGenerationConfig; how many images it asks."""
    if not isinstance(config, dict):
        raise Malformed("#: required key [imageGenerationConfig] not found")
    extra = set(config) - CONFIG_FIELDS
    if extra:
        raise Malformed(f"#/imageGenerationConfig: extraneous key [{sorted(extra)[0]}]")
    n = config.get("numberOfImages", 1)
    if not isinstance(n, int) or not 1 <= n <= 5:
        raise Malformed("#/imageGenerationConfig/numberOfImages: must be 1 to 5")
    if config.get("quality", "standard") not in ("standard", "premium"):
        raise Malformed("#/imageGenerationConfig/quality: not a valid enum value")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed <= max_seed:
        raise Malformed(f"#/imageGenerationConfig/seed: {seed} is not 0 to {max_seed}")
    if not sized and ("width" in config or "height" in config):
        raise Malformed("#/imageGenerationConfig: an edit takes its input image's size")
    return n


def _check_size(config: dict[str, Any], max_seed: int) -> tuple[int, int]:
    width, height = config.get("width", 1024), config.get("height", 1024)
    if not isinstance(width, int) or not isinstance(height, int):
        raise Malformed("#/imageGenerationConfig: width and height must be integers")
    if max_seed != NOVA_MAX_SEED:
        return width, height
    # Nova Canvas's documented size rules.
    if not (320 <= width <= 4096 and 320 <= height <= 4096):
        raise Malformed("#/imageGenerationConfig: width and height are 320 to 4096")
    if width % 16 or height % 16:
        raise Malformed("#/imageGenerationConfig: width and height multiples of 16")
    if width * height >= 4_194_304 or max(width, height) > 4 * min(width, height):
        raise Malformed("#/imageGenerationConfig: under 4,194,304 pixels, 1:4 to 4:1")
    return width, height


def _check_inpainting(params: dict[str, Any]) -> Image.Image:
    if "image" not in params:
        raise Malformed("#/inPaintingParams: required key [image] not found")
    if ("maskImage" in params) == ("maskPrompt" in params):
        raise Malformed("#/inPaintingParams: exactly one of maskImage, maskPrompt")
    picture = _image(params["image"])
    if "maskImage" in params:
        mask = _image(params["maskImage"])
        if mask.size != picture.size:
            raise Malformed("#/inPaintingParams/maskImage: not the image's size")
        colours = {c for _, c in mask.convert("RGB").getcolors(1 << 20) or []}
        if not colours <= {(0, 0, 0), (255, 255, 255)}:
            raise Malformed("#/inPaintingParams/maskImage: only pure black and white")
    return picture


def _image(data: Any) -> Image.Image:
    try:
        picture = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        picture.load()
    except Exception as exc:  # Pillow raises several unrelated types
        raise Malformed("an input image is not a base64 PNG or JPEG") from exc
    if picture.format not in ("PNG", "JPEG"):
        raise Malformed("an input image is not a PNG or JPEG")
    return picture


def _check_stability(body: Any) -> None:
    if not isinstance(body, dict):
        raise Malformed("#: expected type: JSONObject")
    extra = set(body) - STABILITY_FIELDS
    if extra:
        raise Malformed(f"#: extraneous key [{sorted(extra)[0]}] is not permitted")
    if not isinstance(body.get("prompt"), str):
        raise Malformed("#: required key [prompt] not found")
    if body.get("aspect_ratio", "1:1") not in STABILITY_RATIOS:
        raise Malformed("#/aspect_ratio: not a valid enum value")
    if body.get("output_format", "png") not in ("png", "jpeg"):
        raise Malformed("#/output_format: not a valid enum value")
    seed = body.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed <= 4_294_967_294:
        raise Malformed("#/seed: out of range")
