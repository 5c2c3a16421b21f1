"""Every validation rule answers 400 in OpenAI's error shape, naming the bad param."""

from __future__ import annotations

from typing import Any

import pytest

from tests.service.conftest import Service

LONG = "x" * 1001

CASES: list[tuple[str, dict[str, Any], str]] = [
    # (case, request body, expected param)
    ("missing prompt", {"model": "procedural"}, "prompt"),
    ("empty prompt", {"prompt": "  "}, "prompt"),
    ("prompt not a string", {"prompt": 123}, "prompt"),
    ("model not a string", {"prompt": "p", "model": 5}, "model"),
    ("n zero", {"prompt": "p", "n": 0}, "n"),
    ("n above 10", {"prompt": "p", "n": 11}, "n"),
    ("n a string", {"prompt": "p", "n": "2"}, "n"),
    ("n a float", {"prompt": "p", "n": 1.5}, "n"),
    ("bad response_format", {"prompt": "p", "response_format": "png"}, "response_format"),
    ("bad output_format", {"prompt": "p", "output_format": "gif"}, "output_format"),
    (
        "compression above 100",
        {"prompt": "p", "output_format": "jpeg", "output_compression": 101},
        "output_compression",
    ),
    ("compression with png", {"prompt": "p", "output_compression": 50}, "output_compression"),
    ("dall-e-2 size", {"model": "dall-e-2", "prompt": "p", "size": "1792x1024"}, "size"),
    ("dall-e-2 prompt > 1000", {"model": "dall-e-2", "prompt": LONG}, "prompt"),
    ("dall-e-2 quality", {"model": "dall-e-2", "prompt": "p", "quality": "hd"}, "quality"),
    ("dall-e-2 style", {"model": "dall-e-2", "prompt": "p", "style": "vivid"}, "style"),
    ("dall-e-3 n > 1", {"model": "dall-e-3", "prompt": "p", "n": 2}, "n"),
    ("dall-e-3 size", {"model": "dall-e-3", "prompt": "p", "size": "256x256"}, "size"),
    ("dall-e-3 quality", {"model": "dall-e-3", "prompt": "p", "quality": "ultra"}, "quality"),
    ("dall-e-3 style", {"model": "dall-e-3", "prompt": "p", "style": "bold"}, "style"),
    ("dall-e-3 prompt > 4000", {"model": "dall-e-3", "prompt": "y" * 4001}, "prompt"),
    ("gpt-image-1 size", {"model": "gpt-image-1", "prompt": "p", "size": "1792x1024"}, "size"),
    ("gpt-image-1 quality", {"model": "gpt-image-1", "prompt": "p", "quality": "hd"}, "quality"),
    (
        "gpt-image-1 background",
        {"model": "gpt-image-1", "prompt": "p", "background": "pink"},
        "background",
    ),
    (
        "gpt-image-1 moderation",
        {"model": "gpt-image-1", "prompt": "p", "moderation": "off"},
        "moderation",
    ),
    (
        "procedural compression unsupported model",
        {"model": "dall-e-3", "prompt": "p", "output_format": "jpeg", "output_compression": 10},
        "output_compression",
    ),
]


@pytest.mark.parametrize(
    ("body", "param"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_invalid_request_answers_400_naming_param(
    service: Service, body: dict[str, Any], param: str
) -> None:
    with service.client() as client:
        resp = client.post("/v1/images/generations", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"', b""])
def test_malformed_body_answers_400_not_422(service: Service, raw: bytes) -> None:
    with service.client() as client:
        resp = client.post(
            "/v1/images/generations", content=raw, headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_model_not_found(service: Service) -> None:
    with service.client() as client:
        resp = client.post("/v1/images/generations", json={"model": "nope", "prompt": "p"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert resp.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic !!!"}]
)
def test_missing_or_bad_key_is_401(service: Service, headers: dict[str, str]) -> None:
    resp = service.anonymous().post("/v1/images/generations", json={"prompt": "p"}, headers=headers)
    assert resp.status_code == 401
    body = resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "sk-wrong" not in body["error"]["message"]  # the key is never echoed whole


def test_gateway_header_and_explicit_nulls_are_accepted(service: Service) -> None:
    """Obiguard-style: key in x-obiguard-api-key, every optional field null."""
    body = {
        "prompt": "gateway",
        "model": None,
        "n": None,
        "size": None,
        "quality": None,
        "style": None,
        "response_format": None,
        "user": None,
        "output_format": None,
        "output_compression": None,
        "background": None,
        "moderation": None,
    }
    resp = service.anonymous().post(
        "/v1/images/generations",
        json=body,
        headers={"x-obiguard-api-key": service.key_a},
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 1
    assert data[0]["url"].startswith("http")


@pytest.mark.parametrize("header", ["x-obiguard-api-key", "x-portkey-api-key"])
def test_a_gateway_key_header_wins_over_the_sdk_placeholder_bearer(
    service: Service, header: str
) -> None:
    """The obiguard SDK's vendored OpenAI client sends `Authorization: Bearer
    OPENAI_API_KEY` (a placeholder) beside the real key in its own header."""
    headers = {"Authorization": "Bearer OPENAI_API_KEY", header: service.key_a}
    resp = service.anonymous().post(
        "/v1/images/generations",
        json={"prompt": "gateway", "size": "64x64"},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    # A wrong gateway key is refused even beside a valid Bearer key.
    wrong = {"Authorization": f"Bearer {service.key_a}", header: "sk-not-a-key"}
    refused = service.anonymous().post(
        "/v1/images/generations", json={"prompt": "gateway"}, headers=wrong
    )
    assert refused.status_code == 401


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/images/unknown"), ("GET", "/v1/no/such/thing")]
)
def test_an_unknown_path_under_v1_is_404_in_openai_shape_naming_it(
    service: Service, method: str, path: str
) -> None:
    with service.client() as client:
        resp = client.request(method, path, json={})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["message"] == f"Invalid URL ({method} {path})"
    assert (error["type"], error["code"]) == ("invalid_request_error", "not_found")


def test_proxy_style_request_every_item_has_url(service: Service) -> None:
    """Atoma-style: model always given; in url mode every data[] item has a url."""
    with service.client() as client:
        resp = client.post(
            "/v1/images/generations",
            json={
                "model": "procedural",
                "prompt": "three otters",
                "n": 3,
                "size": "64x64",
                "quality": "hd",
                "response_format": "url",
            },
        )
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 3
    assert all(item.get("url") for item in data)


@pytest.mark.parametrize("field", ["size", "model", "quality"])
def test_an_error_quotes_only_a_short_prefix_of_the_bad_value(service: Service, field: str) -> None:
    """A 1 MB `size` came back whole in a 1 MB 400."""
    body = {"prompt": "p", "model": "procedural", field: "x" * 1_000_000}
    with service.client() as http:
        resp = http.post("/v1/images/generations", json=body)
    assert resp.status_code in (400, 404), resp.text[:200]
    assert resp.json()["error"]["param"] == field
    assert len(resp.content) < 4096
    assert "(1000000 characters)" in resp.json()["error"]["message"]


@pytest.mark.parametrize("depth", [100, 900, 100_000])
@pytest.mark.parametrize("path", ["/v1/images/batches", "/v1/images/generations"])
def test_a_deeply_nested_body_is_refused_with_400(service: Service, path: str, depth: int) -> None:
    """900 levels in a native batch's `shared` answered 500."""
    nested = "[" * depth + "]" * depth
    raw = f'{{"prompts": ["p"], "prompt": "p", "shared": {{"user": {nested}}}}}'
    with service.client() as http:
        resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    # Past Python's own recursion limit the body does not parse at all: 400 too.
    if depth < 1000:
        assert "levels deep" in resp.json()["error"]["message"]


def test_a_nul_in_a_multipart_text_field_is_refused(service: Service) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with service.client() as http:
        resp = http.post(
            "/v1/images/edits",
            files={"image": ("in.png", buf.getvalue(), "image/png")},
            data={"prompt": "a\0b", "model": "procedural"},
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "prompt"
