"""The google provider's pure parts: sizes as Google's aspect ratios, the request
bodies of both families, the answers read (images, refusals, usage) and Google's
error answers mapped to retried and refused errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Inputs
from shared.providers.google import (
    Shape,
    family_of,
    gemini_images,
    gemini_request,
    gemini_usage,
    imagen_images,
    imagen_request,
    refuse,
    shape_of,
)
from shared.registry import UpstreamModel

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
B64 = base64.b64encode(PNG).decode()


def spec(model: str, sizes: list[str] | None = None) -> UpstreamModel:
    return UpstreamModel.model_validate(
        {
            "name": "m",
            "provider": "google",
            "upstream_model": model,
            "capabilities": {"sizes": sizes or ["1024x1024"], "max_n": 4},
        }
    )


def params(**kw: Any) -> GenerationParams:
    return GenerationParams.model_validate(
        {"model": "m", "prompt": "a lighthouse", "n": 1, "size": "1024x1024", **kw}
    )


def test_the_model_name_picks_the_family() -> None:
    assert family_of("gemini-2.5-flash-image") == "gemini"
    assert family_of("gemini-3-pro-image-preview") == "gemini"
    assert family_of("imagen-4.0-generate-001") == "imagen"
    assert family_of("models/imagen-4.0-ultra-generate-001") == "imagen"


@pytest.mark.parametrize(
    ("size", "shape"),
    [
        # Exact ratios, and Google's own documented pixel sizes (near their ratio).
        ("1024x1024", Shape("1:1")),
        ("1920x1080", Shape("16:9", "2K")),
        ("1344x768", Shape("16:9")),  # gemini-2.5-flash-image's 16:9
        ("768x1344", Shape("9:16")),
        ("1184x864", Shape("4:3")),
        ("864x1184", Shape("3:4")),
        ("896x1152", Shape("4:5")),
        ("1152x896", Shape("5:4")),
        ("832x1248", Shape("2:3")),
        ("1536x672", Shape("21:9")),
        ("2048x2048", Shape("1:1", "2K")),  # gemini-3-pro-image's 2K
        ("2752x1536", Shape("16:9", "2K")),
        ("4096x4096", Shape("1:1", "4K")),
        ("auto", Shape(None)),
        # No documented ratio near: refused.
        ("1024x256", None),
        ("3000x1000", None),
        ("0x0", None),
    ],
)
def test_gemini_sizes_map_to_documented_aspect_ratios(size: str, shape: Shape | None) -> None:
    assert shape_of(size, "gemini") == shape


@pytest.mark.parametrize(
    ("size", "shape"),
    [
        ("1024x1024", Shape("1:1")),
        ("896x1280", Shape("3:4")),  # Imagen's 3:4, 7% off the ratio
        ("1280x896", Shape("4:3")),
        ("768x1408", Shape("9:16")),
        ("1408x768", Shape("16:9")),
        ("2048x2048", Shape("1:1", "2K")),
        ("4096x4096", Shape("1:1", "2K")),  # Imagen's largest is 2K
        ("1248x832", None),  # 3:2 is Gemini's, not Imagen's
        ("1536x672", None),
    ],
)
def test_imagen_sizes_map_to_its_fewer_aspect_ratios(size: str, shape: Shape | None) -> None:
    assert shape_of(size, "imagen") == shape


def test_a_gemini_request_asks_for_an_image_of_the_ratio_with_the_images_seed() -> None:
    body = gemini_request(
        spec("gemini-3-pro-image-preview"), params(size="2752x1536", seed=10), 2, None
    )
    assert body == {
        "contents": [{"parts": [{"text": "a lighthouse"}]}],
        "generationConfig": {
            "responseModalities": ["TEXT", "IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"},
            "seed": 12,  # image 2 of the job: seed + 2
        },
    }


def test_a_seed_past_int32_wraps_and_auto_sends_no_image_config() -> None:
    body = gemini_request(
        spec("gemini-2.5-flash-image"), params(size="auto", seed=2**32 - 1), 0, None
    )
    config = body["generationConfig"]
    assert config["seed"] == 2**31 - 1
    assert "imageConfig" not in config


def test_a_gemini_edit_sends_its_images_as_inline_data_after_the_prompt() -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"0" * 10
    body = gemini_request(
        spec("gemini-2.5-flash-image"), params(operation="edit"), 0, Inputs([PNG, jpeg])
    )
    parts = body["contents"][0]["parts"]
    assert parts[0] == {"text": "a lighthouse"}
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": B64}}
    assert parts[2]["inlineData"]["mimeType"] == "image/jpeg"


def test_a_gemini_edit_with_a_mask_and_a_variation_are_refused() -> None:
    with pytest.raises(PermanentProviderError) as caught:
        gemini_request(
            spec("gemini-2.5-flash-image"), params(operation="edit"), 0, Inputs([PNG], PNG)
        )
    assert (caught.value.code, caught.value.param) == ("invalid_value", "mask")
    with pytest.raises(PermanentProviderError):
        gemini_request(
            spec("gemini-2.5-flash-image"), params(operation="variation"), 0, Inputs([PNG])
        )


def test_an_unmapped_size_is_refused_naming_the_ratios() -> None:
    with pytest.raises(PermanentProviderError) as caught:
        gemini_request(spec("gemini-2.5-flash-image"), params(size="1024x256"), 0, None)
    assert caught.value.code == "invalid_value"
    assert "21:9" in caught.value.message


def test_an_imagen_request_asks_for_n_samples_with_rai_reasons_and_no_seed() -> None:
    body = imagen_request(spec("imagen-4.0-generate-001"), params(size="2048x2048", seed=5, n=3), 3)
    assert body == {
        "instances": [{"prompt": "a lighthouse"}],
        "parameters": {
            "sampleCount": 3,
            "includeRaiReason": True,
            "aspectRatio": "1:1",
            "sampleImageSize": "2K",
        },
    }
    with pytest.raises(PermanentProviderError):
        imagen_request(spec("imagen-4.0-generate-001"), params(operation="edit"), 1)


def gemini_answer(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> Any:
    return {"candidates": [{"content": {"parts": parts}, "finishReason": finish}], **extra}


def test_a_gemini_answer_gives_its_image_and_usage_skipping_thoughts() -> None:
    answer = gemini_answer(
        [
            {"inlineData": {"mimeType": "image/png", "data": "AAAA"}, "thought": True},
            {"text": "Here you are."},
            {"inlineData": {"mimeType": "image/png", "data": B64}},
        ],
        usageMetadata={
            "promptTokenCount": 12,
            "candidatesTokenCount": 1300,
            "thoughtsTokenCount": 100,
            "totalTokenCount": 1412,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
            "candidatesTokensDetails": [
                {"modality": "IMAGE", "tokenCount": 1290},
                {"modality": "TEXT", "tokenCount": 10},
            ],
        },
    )
    generation = gemini_images(answer, 1)
    assert [image.data for image in generation.images] == [PNG]
    assert generation.usage == {
        "input_tokens": 12,
        "output_tokens": 1400,  # thinking tokens are billed as output
        "total_tokens": 1412,
        "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
        "output_tokens_details": {"text_tokens": 10, "image_tokens": 1290},
    }


def test_usage_without_counts_is_none() -> None:
    assert gemini_usage(None) is None
    assert gemini_usage({"totalTokenCount": 3}) is None


@pytest.mark.parametrize(
    "answer",
    [
        {"promptFeedback": {"blockReason": "SAFETY"}},
        {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "candidates": []},
        {"candidates": [{"finishReason": "IMAGE_SAFETY"}]},
        gemini_answer([{"text": "I can't make that."}], "PROHIBITED_CONTENT"),
        gemini_answer([], "IMAGE_PROHIBITED_CONTENT"),
    ],
)
def test_blocked_prompts_and_filtered_images_are_refusals(answer: Any) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        gemini_images(answer, 1)
    assert caught.value.code == "content_policy_violation"


@pytest.mark.parametrize(
    "answer",
    [
        gemini_answer([{"text": "Sure! Here is a description instead."}]),
        {"candidates": [{"finishReason": "NO_IMAGE"}]},
        {},
        [],
        gemini_answer([{"inlineData": {"mimeType": "image/png", "data": "not base64!"}}]),
    ],
)
def test_an_answer_without_an_image_otherwise_is_tried_again(answer: Any) -> None:
    with pytest.raises(TransientProviderError) as caught:
        gemini_images(answer, 1)
    assert caught.value.code == "upstream_bad_response"


def test_imagen_answers_n_images_and_a_filtered_one_is_a_refusal() -> None:
    image = {"bytesBase64Encoded": B64, "mimeType": "image/png"}
    assert len(imagen_images({"predictions": [image, image]}, 2).images) == 2
    with pytest.raises(PermanentProviderError) as caught:
        imagen_images({"predictions": [image, {"raiFilteredReason": "filtered 1"}]}, 2)
    assert caught.value.code == "content_policy_violation"
    assert "filtered 1" in caught.value.message
    with pytest.raises(TransientProviderError):  # fewer, with no reason given
        imagen_images({"predictions": [image]}, 2)
    with pytest.raises(TransientProviderError):
        imagen_images({}, 1)


def google_error(
    http: int, status: str, message: str = "m", details: list[Any] | None = None, **headers: str
) -> ProviderError:
    error: dict[str, Any] = {"code": http, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    content = json.dumps({"error": error}).encode()
    with pytest.raises(ProviderError) as caught:
        refuse(httpx.Response(http, content=content, headers=headers), content)
    return caught.value


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "43s"}


def test_a_429_is_retried_after_its_retry_delay_or_retry_after() -> None:
    err = google_error(429, "RESOURCE_EXHAUSTED", details=[{"@type": "x.QuotaFailure"}, RETRY_INFO])
    assert isinstance(err, TransientProviderError)
    assert (err.code, err.retry_after) == ("upstream_rate_limited", 43.0)
    err = google_error(429, "RESOURCE_EXHAUSTED", details=[RETRY_INFO], **{"Retry-After": "7"})
    assert err.retry_after == 7.0
    assert google_error(429, "RESOURCE_EXHAUSTED").retry_after is None


@pytest.mark.parametrize(
    ("http", "status", "code"),
    [
        (500, "INTERNAL", "upstream_unavailable"),
        (503, "UNAVAILABLE", "upstream_unavailable"),
        (504, "DEADLINE_EXCEEDED", "upstream_timeout"),
    ],
)
def test_server_errors_are_retried(http: int, status: str, code: str) -> None:
    err = google_error(http, status)
    assert isinstance(err, TransientProviderError)
    assert err.code == code


@pytest.mark.parametrize(
    ("http", "status", "details", "message", "code"),
    [
        (400, "INVALID_ARGUMENT", None, "Invalid JSON payload", "upstream_rejected"),
        (400, "FAILED_PRECONDITION", None, "free tier is not available", "upstream_rejected"),
        (402, "RESOURCE_EXHAUSTED", None, "prepaid credit is used up", "upstream_rejected"),
        (403, "PERMISSION_DENIED", None, "no access", "upstream_auth_error"),
        (401, "UNAUTHENTICATED", None, "no credentials", "upstream_auth_error"),
        (
            400,
            "INVALID_ARGUMENT",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
            "API key not valid. Please pass a valid API key.",
            "upstream_auth_error",
        ),
        (404, "NOT_FOUND", None, "models/x is not found", "provider_misconfigured"),
        (
            400,
            "INVALID_ARGUMENT",
            None,
            "This prompt contains sensitive words that violate Google's Responsible AI practices.",
            "content_policy_violation",
        ),
    ],
)
def test_refusals_are_not_retried(
    http: int, status: str, details: list[Any] | None, message: str, code: str
) -> None:
    err = google_error(http, status, message, details)
    assert isinstance(err, PermanentProviderError)
    assert err.code == code
    assert message in err.message


def test_an_error_that_is_not_json_still_maps_by_status() -> None:
    with pytest.raises(TransientProviderError):
        refuse(httpx.Response(503, content=b"<html>busy</html>"), b"<html>busy</html>")
