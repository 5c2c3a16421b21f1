"""The azure_openai provider: Azure's paths, auth and content-filter answers
(shared/providers/azure_openai.py), on httpx's mock transport."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.azure_openai import AzureOpenAIProvider, filtered
from shared.providers.base import Call, Inputs
from shared.registry import Capabilities, UpstreamModel

PNG = io.BytesIO()
Image.new("RGB", (8, 8)).save(PNG, "PNG")
IMAGE = {"b64_json": base64.b64encode(PNG.getvalue()).decode()}


def spec(**fields: Any) -> UpstreamModel:
    return UpstreamModel(
        name="m",
        provider="azure_openai",
        base_url="https://res.openai.azure.com/",
        api_key_env="AZURE_UNIT_KEY",
        upstream_model="my deployment",
        api_version="2024-10-21",
        capabilities=Capabilities(sizes=["1024x1024"], max_n=4),
        **fields,
    )


def run(
    answer: httpx.Response, params: dict[str, Any] | None = None, inputs: Inputs | None = None
) -> tuple[list[httpx.Request], Any]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    provider = AzureOpenAIProvider(httpx.Client(transport=httpx.MockTransport(handler)))
    fields = {"model": "m", "prompt": "p", "n": 1, "size": "1024x1024", **(params or {})}
    try:
        result: Any = provider.generate(Call(spec(), GenerationParams(**fields), 1, inputs=inputs))
    except (PermanentProviderError, TransientProviderError) as exc:
        result = exc
    return seen, result


def test_the_deployments_path_api_version_and_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_UNIT_KEY", "k1")
    seen, generation = run(httpx.Response(200, json={"created": 1, "data": [IMAGE]}))
    (request,) = seen
    assert str(request.url) == (
        "https://res.openai.azure.com/openai/deployments/my%20deployment/images/generations"
        "?api-version=2024-10-21"
    )
    assert request.headers["api-key"] == "k1"
    assert "authorization" not in request.headers
    assert json.loads(request.content)["prompt"] == "p"
    assert generation.images[0].data == PNG.getvalue()


def test_a_bearer_value_is_sent_as_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_UNIT_KEY", "Bearer entra-token")
    (request,), _ = run(httpx.Response(200, json={"created": 1, "data": [IMAGE]}))
    assert request.headers["authorization"] == "Bearer entra-token"
    assert "api-key" not in request.headers


def test_an_edit_is_multipart_to_images_edits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_UNIT_KEY", "k1")
    (request,), _ = run(
        httpx.Response(200, json={"created": 1, "data": [IMAGE]}),
        {"operation": "edit"},
        Inputs([PNG.getvalue()]),
    )
    assert request.url.raw_path.startswith(b"/openai/deployments/my%20deployment/images/edits?")
    assert request.headers["content-type"].startswith("multipart/form-data")


def test_variations_are_refused_without_a_call() -> None:
    seen, refused = run(httpx.Response(200), {"operation": "variation"}, Inputs([PNG.getvalue()]))
    assert seen == []
    assert isinstance(refused, PermanentProviderError)


RAI = "ResponsibleAIPolicyViolation"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # The Images API's dalleErrorResponse.
        (
            400,
            {
                "error": {
                    "code": "content_policy_violation",
                    "message": "Your request was rejected as a result of our safety system.",
                    "inner_error": {"code": RAI, "content_filter_results": {}},
                }
            },
        ),
        # Azure's other APIs' shape.
        (400, {"error": {"code": "content_filter", "innererror": {"code": RAI}}}),
        (400, {"error": {"code": "BadRequest", "innererror": {"contentFilterResult": {}}}}),
        # The image guide's: a prompt, or the output image, filtered.
        (400, {"created": 1, "error": {"code": "contentFilter", "message": "filtered"}}),
        (200, {"created": 1, "error": {"code": "contentFilter", "message": "filtered"}}),
        (200, {"created": 1, "data": [{"error": {"code": "contentFilter", "message": "f"}}]}),
        (200, {"data": [{"content_filter_results": {"sexual": {"filtered": True}}}]}),
    ],
)
def test_content_filter_answers_are_content_policy_violations(
    status: int, body: dict[str, Any]
) -> None:
    _, refused = run(httpx.Response(status, json=body))
    assert isinstance(refused, PermanentProviderError)
    assert refused.code == "content_policy_violation"


def test_other_errors_keep_their_meaning() -> None:
    _, limited = run(
        httpx.Response(
            429,
            headers={"retry-after-ms": "1500", "Retry-After": "2"},
            json={"error": {"code": "429", "message": "Please retry after 2 seconds."}},
        )
    )
    assert isinstance(limited, TransientProviderError)
    assert limited.retry_after == 1.5
    _, denied = run(httpx.Response(401, json={"error": {"code": "401", "message": "no"}}))
    assert isinstance(denied, PermanentProviderError)
    assert denied.code == "upstream_auth_error"
    _, missing = run(httpx.Response(404, json={"error": {"code": "DeploymentNotFound"}}))
    assert isinstance(missing, PermanentProviderError)
    assert missing.code == "DeploymentNotFound"
    assert not filtered({"code": "invalid_value", "inner_error": {"code": "Other"}})
