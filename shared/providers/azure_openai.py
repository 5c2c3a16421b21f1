"""``azure_openai``: a deployment of Azure OpenAI's image models (dall-e-3, gpt-image-1).

Azure speaks OpenAI's Images API under its own paths, auth and errors, so this is
the OpenAI-compatible provider (request bodies, answers, URL downloads, streams,
retries) with those three replaced:

- ``POST {base_url}/openai/deployments/{upstream_model}/images/generations
  ?api-version={api_version}`` (and ``/images/edits``, multipart, where the API
  version has it: 2025-04-01-preview and later, gpt-image-1 deployments).
  ``base_url`` is the resource's endpoint (``https://NAME.openai.azure.com``),
  ``upstream_model`` the deployment's name (the entry's name without one).
- The key in ``api_key_env`` goes in the ``api-key`` header; a value written
  ``Bearer <token>`` (a Microsoft Entra ID token) goes in ``Authorization`` as is.
- Content filtering: the 400 whose ``error.code`` is ``content_policy_violation``
  (images), ``content_filter`` (Azure's other APIs) or ``contentFilter``, or whose
  inner error (``inner_error``/``innererror``) says ``ResponsibleAIPolicyViolation``
  or carries filter results; an answer whose ``error`` or an image's ``error`` says
  ``contentFilter`` (a filtered output image): all ``content_policy_violation``,
  never retried. Azure's 429 carries ``Retry-After`` (and ``retry-after-ms``),
  honoured as for openai.

Documents: https://learn.microsoft.com/azure/ai-foundry/openai/how-to/dall-e and
the REST reference (https://learn.microsoft.com/azure/ai-foundry/openai/reference,
``dalleErrorResponse``/``dalleInnerError``; spec: Azure/azure-rest-api-specs,
specification/cognitiveservices/data-plane/AzureOpenAI/inference/stable/2024-10-21).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import httpx

from shared.core.context import current
from shared.core.errors import PermanentProviderError
from shared.providers.base import GeneratedImage
from shared.providers.openai_compat import (
    MAX_ERROR_BYTES,
    OpenAICompatibleProvider,
    _read_capped,
    _refusal,
)
from shared.registry import UpstreamModel

CONTENT_POLICY = "content_policy_violation"
# error.code values meaning the content filter refused: the Images API's own, the
# code Azure's other APIs use, the one its image guide shows, and OpenAI's
# gpt-image moderation code.
_FILTER_CODES = {CONTENT_POLICY, "content_filter", "contentFilter", "moderation_blocked"}
_FILTER_RESULTS = ("content_filter_results", "content_filter_result", "contentFilterResult")
# Operations Azure serves on a deployment (no variations).
_OPERATIONS = ("/images/generations", "/images/edits")


def filtered(error: Any) -> bool:
    """Whether an Azure error object says the content filter refused the call."""
    if not isinstance(error, dict):
        return False
    if error.get("code") in _FILTER_CODES:
        return True
    inner = error.get("inner_error", error.get("innererror"))
    if not isinstance(inner, dict):
        return False
    return inner.get("code") == "ResponsibleAIPolicyViolation" or any(
        isinstance(inner.get(name), dict) for name in _FILTER_RESULTS
    )


def _refused(error: dict[str, Any]) -> PermanentProviderError:
    message = error.get("message")
    return PermanentProviderError(
        str(message) if message else "The request was rejected by Azure's content filter.",
        code=CONTENT_POLICY,
    )


class AzureOpenAIProvider(OpenAICompatibleProvider):
    @classmethod
    def shared(cls) -> AzureOpenAIProvider:
        """One HTTP client per process for Azure's calls (its own bounded pool)."""
        return current().made("azure_openai", cls._make)

    def _url(self, spec: UpstreamModel, path: str) -> str:
        if not spec.base_url or not spec.api_version:
            raise PermanentProviderError(
                f"model '{spec.name}' needs base_url and api_version",
                code="provider_misconfigured",
            )
        if path not in _OPERATIONS:
            raise PermanentProviderError(
                f"model '{spec.name}': Azure OpenAI has no {path}", code="invalid_value"
            )
        deployment = quote(spec.upstream_model or spec.name, safe="")
        query = urlencode({"api-version": spec.api_version})
        return f"{spec.base_url.rstrip('/')}/openai/deployments/{deployment}{path}?{query}"

    def _headers(self, spec: UpstreamModel) -> dict[str, str]:
        key = spec.api_key()
        if not key:
            return {}
        if key.startswith("Bearer "):
            return {"Authorization": key}
        return {"api-key": key}

    def _refuse(self, response: httpx.Response) -> NoReturn:
        content = _read_capped(response, MAX_ERROR_BYTES, "error")
        if 400 <= response.status_code < 500 and response.status_code != 429:
            error = _error_object(content)
            if filtered(error):
                raise _refused(error)
        raise _refusal(response, content)

    def _items(self, body: Any) -> Any:
        if isinstance(body, dict) and "data" not in body and filtered(body.get("error")):
            raise _refused(body["error"])
        return super()._items(body)

    def _image(self, item: Any, upstream: str) -> GeneratedImage:
        if isinstance(item, dict):
            if filtered(item.get("error")):
                raise _refused(item["error"])
            if not item.get("b64_json") and not item.get("url") and _any_filtered(item):
                raise _refused({"message": "The image was filtered by Azure's content filter."})
        return super()._image(item, upstream)


def _error_object(content: bytes) -> Any:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def _any_filtered(item: dict[str, Any]) -> bool:
    """An image's ``content_filter_results`` saying a category was filtered."""
    results = item.get("content_filter_results")
    return isinstance(results, dict) and any(
        isinstance(result, dict) and result.get("filtered") is True for result in results.values()
    )
