"""The bedrock provider (shared/providers/bedrock.py): each family's InvokeModel body,
its answers and errors read, and calls through boto3 to the fake Bedrock runtime
(tests/support/fakes/bedrock.py), which checks the SigV4 signature and the body."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from PIL import Image

from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Inputs
from shared.providers.bedrock import (
    BedrockProvider,
    aspect_ratio,
    family,
    parse_answer,
    refuse,
    request_body,
)
from shared.registry import UpstreamModel
from shared.registry.entries import Capabilities
from tests.support.fakes.bedrock import ACCESS_KEY, REGION, SECRET_KEY, FakeBedrock

NOVA = "amazon.nova-canvas-v1:0"
TITAN = "amazon.titan-image-generator-v2:0"
CORE = "stability.stable-image-core-v1:1"


def spec(model: str, base_url: str | None = None, **caps: Any) -> UpstreamModel:
    return UpstreamModel(
        name="m",
        provider="bedrock",
        region=REGION,
        base_url=base_url,
        upstream_model=model,
        capabilities=Capabilities(sizes=["320x320", "1024x1024", "1344x768"], max_n=5, **caps),
    )


def params(**fields: Any) -> GenerationParams:
    return GenerationParams(
        **{"model": "m", "prompt": "a lighthouse", "n": 1, "size": "320x320", **fields}
    )


def png(size: tuple[int, int], mode: str = "RGB", colour: Any = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_nova_and_titan_take_a_text_image_task_with_the_documented_config() -> None:
    call = Call(spec(NOVA), params(n=3, seed=41, quality="hd"), 3, first_index=2)
    assert request_body(call, 3, 0) == {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": "a lighthouse"},
        "imageGenerationConfig": {
            "numberOfImages": 3,
            "width": 320,
            "height": 320,
            "seed": 43,  # the call's first image is the job's image 2: seed + 2
            "quality": "premium",
        },
    }
    titan = request_body(Call(spec(TITAN), params(quality="standard"), 1), 1, 0)
    assert titan["imageGenerationConfig"]["quality"] == "standard"
    assert 0 <= titan["imageGenerationConfig"]["seed"] <= 2_147_483_646  # random, in range


def test_a_seed_beyond_a_familys_range_is_folded_into_it() -> None:
    body = request_body(Call(spec(NOVA), params(seed=858_993_460 + 7), 1), 1, 0)
    assert body["imageGenerationConfig"]["seed"] == 7


def test_stability_takes_prompt_aspect_ratio_seed_and_output_format() -> None:
    call = Call(spec(CORE), params(size="1344x768", seed=5, output_format="jpeg"), 1)
    assert request_body(call, 1, 0) == {
        "prompt": "a lighthouse",
        "aspect_ratio": "16:9",
        "seed": 5,
        "output_format": "jpeg",
    }


def test_sizes_map_to_stabilitys_aspect_ratios_or_are_refused() -> None:
    assert aspect_ratio("1024x1024") == "1:1"
    assert aspect_ratio("832x1216") == "2:3"
    assert aspect_ratio("1920x1080") == "16:9"
    with pytest.raises(PermanentProviderError, match="aspect ratios"):
        aspect_ratio("1000x700")


def test_the_family_is_known_by_model_id_profile_or_arn() -> None:
    assert family("us.amazon.nova-canvas-v1:0") == "nova"
    assert family("arn:aws:bedrock:us-east-1::foundation-model/" + TITAN) == "titan"
    assert family("stability.sd3-5-large-v1:0") == "stability"
    with pytest.raises(PermanentProviderError) as caught:
        family("anthropic.claude-3-haiku")
    assert caught.value.code == "provider_misconfigured"


def test_an_edit_with_a_mask_is_inpainting_with_black_inside_the_mask() -> None:
    mask = Image.new("RGBA", (320, 320), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 160, 320))  # the left half transparent: edited
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    inputs = Inputs([png((320, 320))], buf.getvalue())
    body = request_body(Call(spec(NOVA), params(operation="edit"), 1, inputs=inputs), 1, 0)
    assert body["taskType"] == "INPAINTING"
    assert "width" not in body["imageGenerationConfig"]
    made = Image.open(io.BytesIO(base64.b64decode(body["inPaintingParams"]["maskImage"])))
    assert made.convert("RGB").getpixel((10, 10)) == (0, 0, 0)
    assert made.convert("RGB").getpixel((300, 10)) == (255, 255, 255)
    assert body["inPaintingParams"]["text"] == "a lighthouse"


def test_an_edit_without_transparency_is_a_prompted_variation() -> None:
    inputs = Inputs([png((320, 320)), png((320, 320))])
    body = request_body(Call(spec(NOVA), params(operation="edit"), 1, inputs=inputs), 1, 0)
    assert body["taskType"] == "IMAGE_VARIATION"
    assert len(body["imageVariationParams"]["images"]) == 2
    assert body["imageVariationParams"]["text"] == "a lighthouse"
    variation = Call(spec(NOVA), params(operation="variation"), 1, inputs=Inputs([png((64, 64))]))
    assert "text" not in request_body(variation, 1, 0)["imageVariationParams"]


def test_stability_models_on_bedrock_refuse_edits() -> None:
    call = Call(spec(CORE), params(operation="edit"), 1, inputs=Inputs([png((64, 64))]))
    with pytest.raises(PermanentProviderError):
        request_body(call, 1, 0)


@pytest.mark.parametrize(
    ("kind", "body", "error", "code"),
    [
        (
            "stability",
            {"finish_reasons": ["Filter reason: prompt"]},
            PermanentProviderError,
            "content_policy_violation",
        ),
        (
            "stability",
            {"finish_reasons": ["Inference error"]},
            TransientProviderError,
            "upstream_error",
        ),
        (
            "nova",
            {
                "images": [],
                "error": "All of the generated images have been blocked by our content filters.",
            },
            PermanentProviderError,
            "content_policy_violation",
        ),
        ("nova", {"images": ["aGk="]}, TransientProviderError, "upstream_bad_response"),
        ("nova", {"images": ["not base64!", "x"]}, TransientProviderError, "upstream_bad_response"),
    ],
)
def test_answers_that_are_no_images(
    kind: str, body: dict[str, Any], error: type[ProviderError], code: str
) -> None:
    with pytest.raises(error) as caught:
        parse_answer(kind, body, 2)
    assert caught.value.code == code


def _client_error(code: str, status: int, message: str = "m", **headers: str) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    return ClientError(response, "InvokeModel")


@pytest.mark.parametrize(
    ("code", "status", "error", "ours"),
    [
        ("ThrottlingException", 429, TransientProviderError, "upstream_rate_limited"),
        ("ModelNotReadyException", 429, TransientProviderError, "upstream_unavailable"),
        ("ModelTimeoutException", 408, TransientProviderError, "upstream_timeout"),
        ("ServiceUnavailableException", 503, TransientProviderError, "upstream_unavailable"),
        ("InternalServerException", 500, TransientProviderError, "upstream_unavailable"),
        ("ModelErrorException", 424, TransientProviderError, "upstream_error"),
        ("ValidationException", 400, PermanentProviderError, "upstream_rejected"),
        ("AccessDeniedException", 403, PermanentProviderError, "upstream_auth_error"),
        ("ResourceNotFoundException", 404, PermanentProviderError, "upstream_rejected"),
    ],
)
def test_bedrocks_errors_are_retried_or_refused(
    code: str, status: int, error: type[ProviderError], ours: str
) -> None:
    with pytest.raises(error) as caught:
        refuse(_client_error(code, status))
    assert caught.value.code == ours


def test_a_content_filter_validation_error_is_a_content_policy_violation() -> None:
    message = "This request has been blocked by our content filters. Please adjust your text"
    with pytest.raises(PermanentProviderError) as caught:
        refuse(_client_error("ValidationException", 400, message))
    assert caught.value.code == "content_policy_violation"


def test_a_retry_after_is_honoured_where_one_comes() -> None:
    with pytest.raises(TransientProviderError) as caught:
        refuse(_client_error("ThrottlingException", 429, **{"Retry-After": "7"}))
    assert caught.value.retry_after == 7.0


# --- through boto3, against the fake --------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBedrock]:
    server = FakeBedrock().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake's credentials, and nothing else of the AWS chain (no profile, no
    bearer token, no instance metadata)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_BEARER_TOKEN_BEDROCK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_generation_is_a_signed_invoke_model_call(fake: FakeBedrock) -> None:
    provider = BedrockProvider(timeout=5, pool=4)
    gen = provider.generate(Call(spec(NOVA, fake.base_url), params(prompt="signed", n=2), 2))
    assert [Image.open(io.BytesIO(i.data)).size for i in gen.images] == [(320, 320)] * 2
    (call,) = fake.calls_for("signed")
    assert call["model"] == NOVA
    assert call["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert f"/{REGION}/bedrock/aws4_request" in call["authorization"]
    assert (call["content_type"], call["accept"]) == ("application/json", "application/json")


def test_one_client_per_region_and_endpoint(fake: FakeBedrock) -> None:
    provider = BedrockProvider(timeout=5, pool=4)
    assert provider.client(REGION, fake.base_url) is provider.client(REGION, fake.base_url)
    assert provider.client(REGION, fake.base_url) is not provider.client("eu-west-1", None)


def test_boto3_does_not_retry_on_its_own(fake: FakeBedrock) -> None:
    provider = BedrockProvider(timeout=5, pool=4)
    for marker, error in (
        ("[500-once] a", "upstream_unavailable"),
        ("[throttle-once] b", "upstream_rate_limited"),
    ):
        with pytest.raises(TransientProviderError) as caught:
            provider.generate(Call(spec(NOVA, fake.base_url), params(prompt=marker), 1))
        assert caught.value.code == error
        assert len(fake.calls_for(marker)) == 1


def test_a_wrong_secret_is_refused_as_an_auth_error(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    provider = BedrockProvider(timeout=5, pool=4)
    with pytest.raises(PermanentProviderError) as caught:
        provider.generate(Call(spec(NOVA, fake.base_url), params(prompt="wrong secret"), 1))
    assert caught.value.code == "upstream_auth_error"
    assert "not-the-secret" not in caught.value.message


def test_timeouts_and_connection_failures_are_transient(fake: FakeBedrock) -> None:
    slow = BedrockProvider(timeout=0.3, pool=4)
    with pytest.raises(TransientProviderError) as caught:
        slow.generate(Call(spec(NOVA, fake.base_url), params(prompt="[slow]"), 1))
    assert caught.value.code == "upstream_timeout"
    with pytest.raises(TransientProviderError) as caught:
        slow.generate(Call(spec(NOVA, "http://127.0.0.1:9"), params(), 1))
    assert caught.value.code == "upstream_unavailable"


def test_stability_makes_one_image_a_call_and_refuses_a_filtered_prompt(
    fake: FakeBedrock,
) -> None:
    provider = BedrockProvider(timeout=5, pool=4)
    gen = provider.generate(
        Call(spec(CORE, fake.base_url), params(prompt="two", n=2, size="1024x1024", seed=9), 2)
    )
    assert len(gen.images) == 2
    assert [c["body"]["seed"] for c in fake.calls_for("two")] == [9, 10]
    with pytest.raises(PermanentProviderError) as caught:
        provider.generate(
            Call(spec(CORE, fake.base_url), params(prompt="[content-filter]", size="1024x1024"), 1)
        )
    assert caught.value.code == "content_policy_violation"


def test_an_inpainting_edit_through_the_fake(fake: FakeBedrock) -> None:
    mask = png((320, 320), "RGBA", (0, 0, 0, 0))
    inputs = Inputs([png((320, 320))], mask)
    gen = BedrockProvider(timeout=5, pool=4).generate(
        Call(
            spec(NOVA, fake.base_url), params(prompt="inpaint", operation="edit"), 1, inputs=inputs
        )
    )
    assert Image.open(io.BytesIO(gen.images[0].data)).size == (320, 320)
    (call,) = fake.calls_for("inpaint")
    assert call["body"]["taskType"] == "INPAINTING"
