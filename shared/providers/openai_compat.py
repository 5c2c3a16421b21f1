"""``openai``: any OpenAI-compatible ``/images/generations`` upstream by base URL and key.

Upstream ``url`` answers are downloaded into our storage: a provider URL is never
handed to our client (they expire, and they leak which provider we use).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator
from typing import Any, NoReturn, Self

import httpx

from shared.core.context import Context, current
from shared.core.errors import (
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
    UnresolvableTarget,
    UnsafeTarget,
)
from shared.core.settings import get_settings
from shared.core.storable import clean
from shared.jobs.schemas import GenerationParams
from shared.providers.answers import before_answer
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    Partials,
    entry_of,
)
from shared.registry import UpstreamModel
from shared.webhooks.targets import check_target

_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP date: fall back to our own backoff
    return None


def _error_message(response: httpx.Response, content: bytes) -> tuple[str, str | None]:
    try:
        body = json.loads(content)
    except ValueError:
        return content[:500].decode(errors="replace") or response.reason_phrase, None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or body), err.get("code") or err.get("type")
    if isinstance(err, str):
        return err, None
    return str(body)[:500], None


class OpenAICompatibleProvider:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def shared(cls) -> OpenAICompatibleProvider:
        """One HTTP client per process (its context's): its pool is shared by every
        worker thread."""
        return current().made("openai_compatible", cls._make)

    @classmethod
    def _make(cls, context: Context) -> Self:
        settings = context.settings
        limit = max(64, settings.worker_concurrency * 2)
        return cls(
            httpx.Client(
                timeout=httpx.Timeout(settings.provider_timeout_seconds, connect=10.0),
                # At most 128 kept idle: closing a response makes httpcore walk
                # every pooled connection under its lock, and with 2,000 kept a
                # burst of answers queued on that lock (2,000 calls answered at once
                # took 145 s to complete; 56 s with 128).
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=128),
                follow_redirects=True,
            )
        )

    def _payload(self, spec: UpstreamModel, params: GenerationParams, count: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": spec.upstream_model or spec.name,
            "prompt": params.prompt,
            "n": count,
        }
        if params.size != "auto" or "auto" in spec.capabilities.sizes:
            payload["size"] = params.size
        if spec.upstream_response_format:
            payload["response_format"] = spec.upstream_response_format
        for name in ("quality", "style", "background", "moderation", "user", "output_compression"):
            value = getattr(params, name)
            if value is not None:
                payload[name] = value
        if spec.upstream_response_format is None:  # gpt-image family: format upstream
            payload["output_format"] = params.output_format
        return payload

    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, UpstreamModel)
        params, count, first_index = call.params, call.count, call.first_index
        partials, inputs = call.partials, call.inputs
        headers = self._headers(spec)
        payload = self._payload(spec, params, count)
        if params.operation == "generate":
            request: dict[str, Any] = {"json": payload}
            path = "/images/generations"
        else:
            # Edits and variations: the upstream's own multipart form, as we took it.
            request = _multipart(params, payload, inputs)
            path = f"/images/{params.operation}s"
        url = self._url(spec, path)
        streamed = params.stream and params.partial_images > 0 and spec.upstream_streams
        if streamed:
            # The upstream's own partial images, relayed as they come.
            extra = {"stream": True, "partial_images": params.partial_images}
            if "json" in request:
                request["json"] = {**request["json"], **extra}
            else:
                request["data"] = {
                    **request["data"],
                    "stream": "true",
                    "partial_images": str(params.partial_images),
                }
        with (
            _upstream_errors(),
            self.client.stream("POST", url, headers=headers, **request) as response,
        ):
            if response.status_code >= 400:
                self._refuse(response)
            if streamed:
                return self._streamed(response, count, first_index, partials, url)
            # The body only once the job holds an answer slot (shared/providers/answers.py).
            before_answer()
            content = _read_capped(response, count * MAX_ANSWER_BYTES_PER_IMAGE, "answer")
        try:
            body = json.loads(content)
            items = self._items(body)
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientProviderError(
                "upstream answered without a data list", code="upstream_bad_response"
            ) from exc
        if not isinstance(items, list) or len(items) != count:
            raise TransientProviderError(
                f"upstream returned {len(items) if isinstance(items, list) else 'no'} images "
                f"for n={count}",
                code="upstream_bad_response",
            )
        images = [self._image(item, url) for item in items]
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        return Generation(images=images, usage=usage)

    # What a kind speaking this protocol with its own paths, auth or errors
    # (azure_openai) replaces.

    def _url(self, spec: UpstreamModel, path: str) -> str:
        """Where an operation's call goes (``path``: ``/images/generations``...)."""
        if not spec.base_url:
            raise PermanentProviderError(
                f"model '{spec.name}' has no base_url", code="provider_misconfigured"
            )
        return spec.base_url.rstrip("/") + path

    def _headers(self, spec: UpstreamModel) -> dict[str, str]:
        """The call's credentials (the key from ``api_key_env``, as a bearer token)."""
        key = spec.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _refuse(self, response: httpx.Response) -> NoReturn:
        """An error answer as the provider error it means."""
        _refuse(response)

    def _items(self, body: Any) -> Any:
        """The images of a successful answer (its ``data`` list)."""
        return body["data"]

    def _streamed(
        self,
        response: httpx.Response,
        count: int,
        first_index: int,
        partials: Partials,
        upstream: str,
    ) -> Generation:
        """An upstream's event stream: partial images relayed, completed ones kept."""
        images: list[GeneratedImage] = []
        usage: dict[str, Any] | None = None
        for event in _events(response.iter_lines()):
            kind = str(event.get("type", ""))
            if kind.endswith(".partial_image"):
                index = event.get("partial_image_index")
                data = self._image(event, upstream).data
                partials(first_index + len(images), index if isinstance(index, int) else 0, data)
            elif kind.endswith(".completed"):
                # An event's line is read whole before it is known to be an image;
                # its decoding waits for the job's answer slot.
                before_answer()
                images.append(self._image(event, upstream))
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
            elif isinstance(event.get("error"), dict):
                message = str(event["error"].get("message") or "upstream stream failed")
                raise PermanentProviderError(message, code="upstream_rejected")
        if len(images) != count:
            raise TransientProviderError(
                f"upstream streamed {len(images)} images for n={count}",
                code="upstream_bad_response",
            )
        return Generation(images=images, usage=usage)

    def _image(self, item: Any, upstream: str) -> GeneratedImage:
        """One image of the answer; ``upstream`` is the URL the answer came from."""
        revised = item.get("revised_prompt") if isinstance(item, dict) else None
        revised = clean(revised) if isinstance(revised, str) else None
        if isinstance(item, dict) and item.get("b64_json"):
            try:
                return GeneratedImage(base64.b64decode(item["b64_json"], validate=True), revised)
            except (binascii.Error, ValueError) as exc:
                raise TransientProviderError(
                    "upstream sent invalid base64", code="upstream_bad_response"
                ) from exc
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            return GeneratedImage(self._download(item["url"], upstream), revised)
        raise TransientProviderError(
            "upstream image has neither url nor b64_json", code="upstream_bad_response"
        )

    def _download(self, url: str, upstream: str) -> bytes:
        """An image the upstream answered by URL. A URL on the upstream's own origin is
        trusted as the upstream is (the operator named it); any other passes the
        webhooks' target check first (no loopback, private or metadata address unless
        IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS). Redirects are followed on the same
        origin only, and the body is read up to MAX_DOWNLOAD_BYTES: an upstream
        answering a 302 to our own API made the worker call it, and nothing bounded
        what it read."""
        target = _url(url)
        if _origin(target) != _origin(_url(upstream)):
            try:
                check_target(
                    str(target), allow_private=get_settings().webhook_allow_private_targets
                )
            except UnsafeTarget as exc:
                raise PermanentProviderError(
                    f"the upstream's image URL is refused: {exc}", code="upstream_bad_response"
                ) from None
            except UnresolvableTarget:
                raise TransientProviderError(
                    "the upstream's image host does not resolve", code="upstream_unavailable"
                ) from None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self.client.stream("GET", target, follow_redirects=False) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        following = target.join(resp.headers["location"])
                        if _origin(following) != _origin(target):
                            raise PermanentProviderError(
                                "the upstream's image URL redirects to another host",
                                code="upstream_bad_response",
                            )
                        target = following
                        continue
                    if resp.status_code != 200:
                        raise TransientProviderError(
                            f"downloading the upstream image answered {resp.status_code}",
                            code="upstream_unavailable",
                        )
                    return _read_capped(resp, MAX_DOWNLOAD_BYTES, "image")
            except httpx.HTTPError as exc:
                raise TransientProviderError(
                    f"downloading the upstream image failed: {exc}", code="upstream_unavailable"
                ) from exc
        raise PermanentProviderError(
            "the upstream's image URL redirects too often", code="upstream_bad_response"
        )


# The most bytes one downloaded image may have (a 4096x4096 RGBA PNG stored raw is
# 64 MiB), and redirects followed on the upstream image's own origin.
MAX_DOWNLOAD_BYTES = 80 * 1024 * 1024
MAX_REDIRECTS = 3
# An answer carries each image as base64 (4/3 of its bytes) and a little JSON; an
# error answer is a short JSON object.
MAX_ANSWER_BYTES_PER_IMAGE = MAX_DOWNLOAD_BYTES * 4 // 3 + 64 * 1024
MAX_ERROR_BYTES = 1024 * 1024


def _url(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise PermanentProviderError(
            "the upstream's image URL is not a URL", code="upstream_bad_response"
        ) from exc


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _read_capped(resp: httpx.Response, limit: int, what: str) -> bytes:
    """The body, read up to ``limit``."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise PermanentProviderError(
                f"the upstream's {what} is larger than {limit} bytes",
                code="upstream_bad_response",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart(
    params: GenerationParams, payload: dict[str, Any], inputs: Inputs | None
) -> dict[str, Any]:
    """The fields and files of an upstream edit or variation (``image`` for one
    image, ``image[]`` for several, as OpenAI's clients send them)."""
    if inputs is None or not inputs.images:
        raise PermanentProviderError("an edit needs an input image", code="invalid_value")
    fields = {name: str(value) for name, value in payload.items()}
    if params.operation == "variation":
        fields.pop("prompt", None)
    elif params.input_fidelity is not None:
        fields["input_fidelity"] = params.input_fidelity
    name = "image" if len(inputs.images) == 1 else "image[]"
    files = [(name, (f"image-{i}", data)) for i, data in enumerate(inputs.images)]
    if inputs.mask is not None:
        files.append(("mask", ("mask.png", inputs.mask)))
    return {"data": fields, "files": files}


@contextlib.contextmanager
def _upstream_errors() -> Iterator[None]:
    """Timeouts and connection failures as transient provider errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransientProviderError(
            f"upstream timed out: {type(exc).__name__}", code="upstream_timeout"
        ) from exc
    except httpx.TransportError as exc:
        raise TransientProviderError(
            f"upstream connection failed: {exc}", code="upstream_unavailable"
        ) from exc


def _refuse(response: httpx.Response) -> NoReturn:
    """An upstream's error answer as the provider error it means (its body read here,
    up to MAX_ERROR_BYTES)."""
    raise _refusal(response, _read_capped(response, MAX_ERROR_BYTES, "error"))


def _refusal(response: httpx.Response, content: bytes) -> ProviderError:
    """The provider error an error answer (``content``, its body) means: 429, 5xx
    and the like transient (with the answer's Retry-After), the rest permanent."""
    message, code = _error_message(response, content)
    status = response.status_code
    if status in _TRANSIENT_STATUS:
        return TransientProviderError(
            f"upstream answered {status}: {message}",
            code="upstream_rate_limited" if status == 429 else "upstream_unavailable",
            retry_after=_retry_after(response),
        )
    if status in (401, 403):
        code = "upstream_auth_error"
    return PermanentProviderError(message, code=code or "upstream_rejected")


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events' JSON data, one object per event."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line.strip() and data:
            text, data = "\n".join(data), []
            if text == "[DONE]":
                return
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
