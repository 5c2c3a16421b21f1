"""``bedrock``: Amazon Bedrock's ``InvokeModel`` through boto3's ``bedrock-runtime``
client, with the request body of the model family the entry's ``upstream_model``
(the Bedrock model id, or an inference profile / ARN naming one) belongs to.

Followed documents:

- InvokeModel (Bedrock runtime API reference, and botocore's own service model for
  ``bedrock-runtime``): ``POST /model/{modelId}/invoke``, the body as the model
  family defines it, its errors (ThrottlingException, ModelNotReadyException,
  ModelTimeoutException, ServiceUnavailableException, InternalServerException,
  ModelErrorException, ServiceQuotaExceededException, ValidationException,
  AccessDeniedException, ResourceNotFoundException).
  https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_InvokeModel.html
- Amazon Nova Canvas, request and response structure, and its error handling (a
  ValidationException "This request has been blocked by our content filters" for an
  input refused; a 200 whose ``error`` says generated images were blocked for an
  output refused).
  https://docs.aws.amazon.com/nova/latest/userguide/image-gen-req-resp-structure.html
  https://docs.aws.amazon.com/nova/latest/userguide/image-gen-errors.html
- Amazon Titan Image Generator G1 (v1 and v2) inference parameters (the same
  ``taskType`` / ``imageGenerationConfig`` body and ``{"images", "error"}`` answer).
  https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-titan-image.html
- Stability AI models on Bedrock (Stable Image Core / Ultra, SD3.5 Large): body
  ``prompt``, ``aspect_ratio``, ``seed``, ``output_format``; answer ``images``,
  ``seeds``, ``finish_reasons`` (null, or "Filter reason: ..." / "Inference error").
  https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-diffusion-stable-image-core-text-image-request-response.html

Credentials come from boto3's usual chain (environment, shared config and
profiles, container and instance roles), never from our settings, and are never
logged here; SigV4 is boto3's. boto3's own retries are off (one attempt per call):
the worker retries, spacing its attempts and honouring Retry-After.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import secrets
import threading
from dataclasses import dataclass
from math import gcd
from typing import Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from PIL import Image

from shared.core.context import Context, current
from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import Call, GeneratedImage, Generation, Inputs, entry_of
from shared.providers.openai_compat import MAX_ANSWER_BYTES_PER_IMAGE
from shared.registry import UpstreamModel
from shared.registry.entries import parse_size

# The error codes botocore raises (ClientError's Error.Code) worth another attempt.
_TRANSIENT_CODES = {
    "ThrottlingException": "upstream_rate_limited",
    "ModelNotReadyException": "upstream_unavailable",
    "ServiceQuotaExceededException": "upstream_rate_limited",
    "ModelTimeoutException": "upstream_timeout",
    "ServiceUnavailableException": "upstream_unavailable",
    "InternalServerException": "upstream_unavailable",
    "InternalFailure": "upstream_unavailable",
    "ModelErrorException": "upstream_error",
}
_AUTH_CODES = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignature",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "MissingAuthenticationToken",
}
# Nova's and Titan's words for a prompt, an input image or an output refused.
_CONTENT_FILTERED = re.compile(r"blocked by (our )?content filters?|content filter", re.I)

# Most images one InvokeModel call makes: Nova Canvas and Titan's numberOfImages is
# 1 to 5; a Stability model makes one.
NOVA_MAX_IMAGES = 5
# Seeds each family takes (their documents): larger seeds are folded into range.
_SEED_LIMITS = {"nova": 858_993_459, "titan": 2_147_483_646, "stability": 4_294_967_294}
# Stability's aspect ratios on Bedrock and the size each makes (their native
# resolutions): a size is sent as its ratio, so only these sizes map.
STABILITY_SIZES = {
    "1024x1024": "1:1",
    "1344x768": "16:9",
    "768x1344": "9:16",
    "1536x640": "21:9",
    "640x1536": "9:21",
    "1216x832": "3:2",
    "832x1216": "2:3",
    "1088x896": "5:4",
    "896x1088": "4:5",
}
_STABILITY_RATIOS = set(STABILITY_SIZES.values())


def family(model_id: str) -> str:
    """``nova``, ``titan`` or ``stability``, from a Bedrock model id, an inference
    profile id (``us.amazon.nova-canvas-v1:0``) or an ARN ending in one."""
    name = model_id.rsplit("/", 1)[-1].lower()
    if "amazon.nova-canvas" in name:
        return "nova"
    if "amazon.titan-image-generator" in name:
        return "titan"
    if "stability." in name:
        return "stability"
    raise PermanentProviderError(
        f"bedrock model {model_id!r} is not an image model this service speaks "
        "(Amazon Nova Canvas, Titan Image Generator, or a Stability model)",
        code="provider_misconfigured",
    )


def _seed(params: GenerationParams, kind: str, offset: int) -> int:
    """The call's seed: the job's seed for its first image (``seed + index``, as
    recorded), folded into the family's range; a random one where the request has
    none (Nova and Titan default to a fixed seed, every call the same image)."""
    limit = _SEED_LIMITS[kind]
    if params.seed is None:
        return secrets.randbelow(limit + 1)
    return (params.seed + offset) % (limit + 1)


def _dimensions(spec: UpstreamModel, params: GenerationParams) -> tuple[int, int]:
    size = parse_size(params.size) or parse_size(spec.default_size)
    if size is None:
        raise PermanentProviderError(
            f"model '{spec.name}': size {params.size!r} has no width and height for Bedrock",
            code="invalid_value",
        )
    return size


def aspect_ratio(size: str) -> str:
    """A Stability model's ``aspect_ratio`` for ``size``: its native sizes, or any
    size of exactly one of its ratios."""
    if size in STABILITY_SIZES:
        return STABILITY_SIZES[size]
    wh = parse_size(size)
    if wh is not None and wh[0] and wh[1]:
        divisor = gcd(*wh)
        ratio = f"{wh[0] // divisor}:{wh[1] // divisor}"
        if ratio in _STABILITY_RATIOS:
            return ratio
    raise PermanentProviderError(
        f"size {size!r} is none of the aspect ratios a Stability model on Bedrock takes "
        f"({', '.join(sorted(_STABILITY_RATIOS))})",
        code="invalid_value",
    )


def _quality(params: GenerationParams) -> str | None:
    if params.quality is None:
        return None
    return "premium" if params.quality in ("premium", "hd", "high") else "standard"


def _config(
    spec: UpstreamModel, params: GenerationParams, count: int, kind: str, offset: int
) -> dict[str, Any]:
    width, height = _dimensions(spec, params)
    config: dict[str, Any] = {
        "numberOfImages": count,
        "width": width,
        "height": height,
        "seed": _seed(params, kind, offset),
    }
    quality = _quality(params)
    if quality is not None:
        config["quality"] = quality
    return config


def request_body(call: Call, count: int, offset: int) -> dict[str, Any]:
    """The InvokeModel body for ``count`` images of ``call``, the first being the
    job's image ``call.first_index + offset``."""
    spec = entry_of(call.spec, UpstreamModel)
    params = call.params
    kind = family(spec.upstream_model or spec.name)
    if kind == "stability":
        if params.operation != "generate":
            raise PermanentProviderError(
                f"model '{spec.name}': edits are not served by a Stability model on Bedrock",
                code="invalid_request",
            )
        return {
            "prompt": params.prompt,
            "aspect_ratio": aspect_ratio(
                params.size if params.size != "auto" else spec.default_size
            ),
            "seed": _seed(params, kind, call.first_index + offset),
            "output_format": "jpeg" if params.output_format == "jpeg" else "png",
        }
    config = _config(spec, params, count, kind, call.first_index + offset)
    if params.operation == "generate":
        return {
            "taskType": "TEXT_IMAGE",
            "textToImageParams": {"text": params.prompt},
            "imageGenerationConfig": config,
        }
    return _edit_body(params, call.inputs, config)


def _edit_body(
    params: GenerationParams, inputs: Inputs | None, config: dict[str, Any]
) -> dict[str, Any]:
    """An edit as INPAINTING where a mask says where (the mask's transparent pixels,
    or the image's own where no mask is sent, as OpenAI's edits read them), else as
    IMAGE_VARIATION of the images guided by the prompt; a variation as
    IMAGE_VARIATION. The output takes the input image's size."""
    if inputs is None or not inputs.images:
        raise PermanentProviderError("an edit needs an input image", code="invalid_value")
    del config["width"], config["height"]  # the input image's own
    pictures = [Image.open(io.BytesIO(data)) for data in inputs.images]
    if params.operation == "edit":
        source = inputs.mask if inputs.mask is not None else inputs.images[0]
        mask = _mask(Image.open(io.BytesIO(source)), pictures[0].size)
        if mask is not None:
            return {
                "taskType": "INPAINTING",
                "inPaintingParams": {
                    "image": _png64(pictures[0]),
                    "maskImage": mask,
                    "text": params.prompt,
                },
                "imageGenerationConfig": config,
            }
    variation: dict[str, Any] = {"images": [_png64(p) for p in pictures[:5]]}
    if params.operation == "edit":
        variation["text"] = params.prompt
    return {
        "taskType": "IMAGE_VARIATION",
        "imageVariationParams": variation,
        "imageGenerationConfig": config,
    }


def _png64(picture: Image.Image) -> str:
    """An input image as Bedrock takes it: base64 PNG, RGB (no transparency)."""
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mask(picture: Image.Image, size: tuple[int, int]) -> str | None:
    """OpenAI's mask (fully transparent pixels are edited) as Nova's and Titan's
    ``maskImage`` (black pixels are inside the mask, white outside), or None where
    no pixel is transparent."""
    if "A" not in picture.getbands() and picture.info.get("transparency") is None:
        return None
    alpha = picture.convert("RGBA").getchannel("A")
    if alpha.size != size:
        alpha = alpha.resize(size)
    if alpha.getextrema()[0] != 0:
        return None
    black_inside = alpha.point(lambda a: 0 if a == 0 else 255).convert("RGB")
    buf = io.BytesIO()
    black_inside.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Answer:
    images: list[bytes]
    seeds: list[int] | None = None


def parse_answer(kind: str, body: Any, count: int) -> Answer:
    """An InvokeModel answer's images, or the provider error it means."""
    if not isinstance(body, dict):
        raise TransientProviderError(
            "bedrock answered something other than a JSON object", code="upstream_bad_response"
        )
    if kind == "stability":
        reasons = body.get("finish_reasons")
        for reason in reasons if isinstance(reasons, list) else []:
            if reason is None:
                continue
            if str(reason).lower().startswith("filter reason"):
                raise PermanentProviderError(
                    f"the model refused the request ({reason})", code="content_policy_violation"
                )
            raise TransientProviderError(f"the model failed: {reason}", code="upstream_error")
    else:
        error = body.get("error")
        if error:
            if _CONTENT_FILTERED.search(str(error)):
                raise PermanentProviderError(str(error), code="content_policy_violation")
            raise TransientProviderError(f"bedrock answered: {error}", code="upstream_error")
    images = body.get("images")
    if not isinstance(images, list) or len(images) != count:
        raise TransientProviderError(
            f"bedrock returned {len(images) if isinstance(images, list) else 'no'} images "
            f"for {count}",
            code="upstream_bad_response",
        )
    try:
        data = [base64.b64decode(item, validate=True) for item in images]
    except (binascii.Error, ValueError, TypeError) as exc:
        raise TransientProviderError(
            "bedrock sent invalid base64", code="upstream_bad_response"
        ) from exc
    seeds = body.get("seeds")
    return Answer(data, seeds if isinstance(seeds, list) else None)


def _retry_after(headers: dict[str, str]) -> float | None:
    """A Retry-After in seconds where the answer carries one (Bedrock documents
    none; honoured should it come)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def refuse(exc: ClientError) -> NoReturn:
    """A ClientError as the provider error it means."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or exc)
    meta = exc.response.get("ResponseMetadata", {})
    status = int(meta.get("HTTPStatusCode") or 0)
    headers = {str(k).lower(): str(v) for k, v in (meta.get("HTTPHeaders") or {}).items()}
    text = f"bedrock {code or status}: {message}"
    if code == "ValidationException" and _CONTENT_FILTERED.search(message):
        raise PermanentProviderError(message, code="content_policy_violation")
    if code in _TRANSIENT_CODES or (not code and (status >= 500 or status in (408, 429))):
        raise TransientProviderError(
            text,
            code=_TRANSIENT_CODES.get(code)
            or ("upstream_rate_limited" if status == 429 else "upstream_unavailable"),
            retry_after=_retry_after(headers),
        )
    if code in _AUTH_CODES or status in (401, 403):
        raise PermanentProviderError(text, code="upstream_auth_error")
    if status >= 500:
        raise TransientProviderError(text, code="upstream_unavailable")
    raise PermanentProviderError(text, code="upstream_rejected")


class BedrockProvider:
    """One ``bedrock-runtime`` client per (region, endpoint) per process, made on
    first use and shared by every worker thread (boto3's clients are thread-safe;
    making one is not, hence the lock)."""

    def __init__(self, timeout: float, pool: int) -> None:
        self._timeout = timeout
        self._pool = pool
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> BedrockProvider:
        return current().made("bedrock", cls._make)

    @classmethod
    def _make(cls, context: Context) -> BedrockProvider:
        settings = context.settings
        # Connections kept per client (urllib3's pool; more are opened when needed).
        return cls(settings.provider_timeout_seconds, 128)

    def client(self, region: str, endpoint: str | None) -> Any:
        key = (region, endpoint)
        made = self._clients.get(key)
        if made is not None:
            return made
        with self._lock:
            if key not in self._clients:
                config = Config(
                    region_name=region,
                    connect_timeout=10,
                    read_timeout=self._timeout,
                    # One attempt: the worker retries (its backoff, Retry-After,
                    # other deployments), so boto3's own would multiply its tries.
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    max_pool_connections=self._pool,
                    user_agent_extra="imagegen",
                )
                session = boto3.session.Session()  # the default chain, made here once
                self._clients[key] = session.client(
                    "bedrock-runtime", endpoint_url=endpoint, config=config
                )
            return self._clients[key]

    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, UpstreamModel)
        if not spec.region:
            raise PermanentProviderError(
                f"model '{spec.name}' has no region", code="provider_misconfigured"
            )
        model_id = spec.upstream_model or spec.name
        kind = family(model_id)
        per_call = 1 if kind == "stability" else NOVA_MAX_IMAGES
        client = self.client(spec.region, spec.base_url)
        images: list[GeneratedImage] = []
        # One call makes what the family can (upstream_max_n set right, one call).
        while len(images) < call.count:
            count = min(per_call, call.count - len(images))
            body = request_body(call, count, len(images))
            answer = self._invoke(client, model_id, kind, body, count)
            images += [GeneratedImage(data) for data in answer.images]
        return Generation(images=images)

    def _invoke(
        self, client: Any, model_id: str, kind: str, body: dict[str, Any], count: int
    ) -> Answer:
        try:
            response = client.invoke_model(
                modelId=model_id,
                body=json.dumps(body).encode(),
                contentType="application/json",
                accept="application/json",
            )
            # The body only once the job holds an answer slot (shared/providers/answers.py).
            before_answer()
            limit = count * MAX_ANSWER_BYTES_PER_IMAGE
            content = response["body"].read(limit + 1)
        except ClientError as exc:
            refuse(exc)
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise TransientProviderError(
                f"bedrock timed out: {type(exc).__name__}", code="upstream_timeout"
            ) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            raise TransientProviderError(
                f"bedrock connection failed: {exc}", code="upstream_unavailable"
            ) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise PermanentProviderError(
                "no AWS credentials for bedrock (the AWS chain found none)",
                code="provider_misconfigured",
            ) from exc
        except BotoCoreError as exc:
            raise PermanentProviderError(
                f"bedrock call failed: {type(exc).__name__}", code="upstream_rejected"
            ) from exc
        if len(content) > limit:
            raise PermanentProviderError(
                f"bedrock's answer is larger than {limit} bytes", code="upstream_bad_response"
            )
        try:
            parsed = json.loads(content)
        except ValueError as exc:
            raise TransientProviderError(
                "bedrock answered with no JSON", code="upstream_bad_response"
            ) from exc
        return parse_answer(kind, parsed, count)
