"""Our answers, held to OpenAI's own published OpenAPI document for the Images API.

tests/support/openai_images.yaml is the three image operations of
openai/openai-openapi's openapi.yaml (its header names the commit;
docs/openai-schema.md says how to refresh it). `imagegen dev` serves a model of
every kind: OpenAI-compatible dall-e-2, dall-e-3 and gpt-image-1 (the fake
upstream), procedural, a local diffusers model (a tiny pipeline built here), and
a procedural and a local model declared GPT-image-like in the registry. Every
answer of every kind, JSON and streamed, must validate against the document; then
Schemathesis generates requests from the document and finds no 5xx and no answer
that violates it.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from PIL import Image

from tests.support.fake_upstream import EXPECTED_KEY, FakeUpstream
from tests.support.processes import ServiceProcess, free_port, wait_http
from tests.support.schema_operations import Operation, operations
from tests.support.stack import models_yaml
from tests.support.tiny_diffusion import build_tiny_sd

KEY = "sk-ig-openai-schema-test"
DOCUMENT = Path(__file__).resolve().parents[1] / "support" / "openai_images.yaml"


def _load_document() -> schemathesis.BaseSchema:
    """The published document, with one reading made explicit: its text/event-stream
    schema is that of one event's JSON (the `data:` line), as its examples show,
    while Schemathesis would match each parsed `{event, data}` pair against it."""
    document = yaml.safe_load(DOCUMENT.read_text())
    for path, event in (
        ("/images/generations", "ImageGenStreamEvent"),
        ("/images/edits", "ImageEditStreamEvent"),
    ):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"]["schema"] = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": f"#/components/schemas/{event}"},
                },
            },
        }
    return schemathesis.openapi.from_dict(copy.deepcopy(document))


SCHEMA = _load_document()

SIZES = ["1024x1024", "1536x1024", "1024x1536", "256x256", "512x512", "64x64"]
TINY_SD = {
    "provider": "diffusers",
    "device": "cpu",
    "steps": 2,
    "capabilities": {"sizes": ["64x64", "32x48"], "max_n": 2},
}


def _models(upstream_url: str, tiny_sd: str) -> list[dict[str, Any]]:
    # The e2e stack's OpenAI-compatible entries, in front of the fake upstream.
    stack = {m["name"]: m for m in models_yaml(upstream_url)["models"]}
    return [
        stack["dall-e-2"],
        stack["dall-e-3"],
        stack["gpt-image-1"],
        {
            "name": "procedural",
            "provider": "procedural",
            "capabilities": {"sizes": SIZES, "max_n": 2, "edits": True, "variations": True},
        },
        {
            "name": "procedural-gpt",
            "provider": "procedural",
            "answer_shape": "gpt-image",
            "capabilities": {
                "sizes": SIZES,
                "max_n": 2,
                "qualities": ["low", "medium", "high", "auto"],
                "backgrounds": ["auto", "transparent", "opaque"],
                "edits": True,
            },
        },
        {"name": "tiny-sd", "model_path": tiny_sd, **TINY_SD},
        {"name": "tiny-sd-gpt", "model_path": tiny_sd, "answer_shape": "gpt-image", **TINY_SD},
    ]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = Path(tmp_path_factory.mktemp("openai-schema"))
    upstream = FakeUpstream().start()
    models = home / "models.yaml"
    tiny = str(build_tiny_sd(home))
    models.write_text(yaml.safe_dump({"models": _models(upstream.base_url, tiny)}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env |= {
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_DEV_API_KEY": KEY,
        "IMAGEGEN_MODELS_FILE": str(models),
        "FAKE_UPSTREAM_KEY": EXPECTED_KEY,
    }
    proc = ServiceProcess(["dev"], env, home / "dev.log", cwd=home).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.stop()
        upstream.stop()
    assert "Traceback" not in proc.log()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (200, 40, 40, 255)).save(buf, format="PNG")
    return buf.getvalue()


def _valid(operation: str, response: httpx.Response) -> dict[str, Any] | None:
    """Raise unless the answer is a 200 the published document allows; the JSON
    body, if it is JSON."""
    assert response.status_code == 200, response.text
    response.request.read()  # a multipart body is streamed; Schemathesis reads it
    answer = schemathesis.Response.from_httpx(response, verify=True)
    SCHEMA[operation]["POST"].validate_response(answer)
    if response.headers["content-type"].startswith("application/json"):
        body: dict[str, Any] = response.json()
        return body
    return None


GPT_LIKE = ("gpt-image-1", "procedural-gpt", "tiny-sd-gpt")
DALL_E_LIKE = ("dall-e-2", "dall-e-3", "procedural", "tiny-sd")


def _size(model: str) -> str:
    return {"dall-e-2": "256x256", "dall-e-3": "1024x1024"}.get(
        model, "64x64" if model.startswith("tiny") else "1024x1024"
    )


@pytest.mark.parametrize("model", DALL_E_LIKE + GPT_LIKE)
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_generations_answer_as_the_published_schema_has_it(
    dev: str, model: str, response_format: str | None
) -> None:
    request: dict[str, Any] = {"model": model, "prompt": "a red fox", "size": _size(model)}
    if response_format:
        request["response_format"] = response_format
    with httpx.Client(base_url=dev, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        body = _valid("/images/generations", h.post("/images/generations", json=request))
    assert body is not None
    extras = {"size", "quality", "background", "output_format", "usage"} & set(body)
    if model in DALL_E_LIKE:
        assert extras == set(), body.keys()
    else:
        # Inside the schema's enums: a listed size is kept, 64x64 is left out.
        assert "output_format" in extras
        assert ("size" in extras) == (request["size"] == "1024x1024")
    assert set(body) <= {"created", "data", *extras}


@pytest.mark.parametrize(
    ("model", "partial_images"),
    [
        ("gpt-image-1", 0),
        ("gpt-image-1", 2),
        ("procedural", 2),
        ("procedural-gpt", 0),
        ("tiny-sd", 2),
    ],
)
def test_every_streamed_event_is_one_the_schema_lists(
    dev: str, model: str, partial_images: int
) -> None:
    request = {
        "model": model,
        "prompt": "a streamed fox",
        "size": "64x64",
        "stream": True,
        "partial_images": partial_images,
    }
    with httpx.Client(base_url=dev, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        response = h.post("/images/generations", json=request)
    _valid("/images/generations", response)
    assert "event: image_generation.completed" in response.text


@pytest.mark.parametrize(
    ("model", "stream"),
    [("dall-e-2", False), ("gpt-image-1", False), ("gpt-image-1", True), ("procedural", True)],
    ids=["dall-e-2", "gpt-image-1", "gpt-image-1-stream", "procedural-stream"],
)
def test_edits_answer_as_the_published_schema_has_it(dev: str, model: str, stream: bool) -> None:
    size = (256, 256) if model == "dall-e-2" else (1024, 1024)
    form = {"model": model, "prompt": "add a hat", "size": f"{size[0]}x{size[1]}"}
    if stream:
        form |= {"stream": "true", "partial_images": "1"}
    with httpx.Client(base_url=dev, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        response = h.post(
            "/images/edits", data=form, files={"image": ("in.png", _png(size), "image/png")}
        )
    body = _valid("/images/edits", response)
    if stream:
        assert "event: image_edit.completed" in response.text
    else:
        assert body is not None
        assert ("size" in body) == (model == "gpt-image-1")


@pytest.mark.parametrize("model", ["dall-e-2", "procedural"])
def test_variations_answer_as_the_published_schema_has_it(dev: str, model: str) -> None:
    with httpx.Client(base_url=dev, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        response = h.post(
            "/images/variations",
            data={"model": model, "n": "2", "size": "256x256"},
            files={"image": ("in.png", _png((256, 256)), "image/png")},
        )
    body = _valid("/images/variations", response)
    assert body is not None
    assert set(body) == {"created", "data"}


def test_the_validation_catches_what_the_issue_reported() -> None:
    """The check can fail: dall-e-2's old answer (a top-level 256x256) violates it."""
    request = requests.Request("POST", "http://x.test/v1/images/generations").prepare()
    old = schemathesis.Response(
        status_code=200,
        headers={"content-type": ["application/json"]},
        content=b'{"created": 1, "data": [{"url": "http://x.test/a.png"}], "size": "256x256"}',
        request=request,
        elapsed=0.0,
        verify=True,
    )
    with pytest.raises(Exception, match="256x256"):
        SCHEMA["/images/generations"]["POST"].validate_response(old)
    bad_event = schemathesis.Response(
        status_code=200,
        headers={"content-type": ["text/event-stream"]},
        content=b'event: image_generation.completed\ndata: {"type": '
        b'"image_generation.completed", "b64_json": "", "created_at": 1, "size": "64x64", '
        b'"quality": "auto", "background": "auto", "output_format": "png", "usage": {}}\n\n',
        request=request,
        elapsed=0.0,
        verify=True,
    )
    with pytest.raises(Exception, match="64x64"):
        SCHEMA["/images/generations"]["POST"].validate_response(bad_event)


# Requests generated from OpenAI's document: most ask what our models refuse (a
# documented 400 of ours, which OpenAI's document, listing 200 only, says nothing
# of), the rest are served. Neither may be a 5xx or contradict the document.
# One test per operation (tests/support/schema_operations.py says why).
@pytest.mark.parametrize("operation", operations(SCHEMA))
def test_schemathesis_finds_no_violation_and_no_server_error(
    operation: Operation, dev: str, http: requests.Session
) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def no_violation(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=dev,
            session=http,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
            checks=[
                schemathesis.checks.not_a_server_error,
                schemathesis.checks.response_schema_conformance,
            ],
        )

    no_violation()
