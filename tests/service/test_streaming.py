"""`stream: true` on generations, read by the `openai` package (in-process: no
Redis, so no partial images, only the completed events)."""

from __future__ import annotations

import base64
import io

import openai
from openai.types import ImageGenCompletedEvent
from PIL import Image

from tests.service.conftest import Service


def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    )


def test_a_streamed_generation_ends_with_one_completed_event_per_image(
    service: Service,
) -> None:
    with client(service) as api:
        events = list(
            api.images.generate(
                model="procedural", prompt="streamed", size="64x64", n=2, stream=True
            )
        )
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    for event in events:
        image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert (image.format, image.size) == ("PNG", (64, 64))
        # 64x64 is outside the size enum of OpenAI's event schema: sent as "auto".
        assert (event.size, event.quality, event.background) == ("auto", "auto", "auto")
        assert event.output_format == "png"
        assert isinstance(event, ImageGenCompletedEvent)
        assert event.usage.total_tokens == 0


def test_streaming_rules_name_their_param(service: Service) -> None:
    with service.client() as http:
        partial_alone = http.post(
            "/v1/images/generations", json={"prompt": "p", "partial_images": 2}
        )
        url_stream = http.post(
            "/v1/images/generations",
            json={"prompt": "p", "stream": True, "response_format": "url"},
        )
        too_many = http.post(
            "/v1/images/generations", json={"prompt": "p", "stream": True, "partial_images": 4}
        )
    assert partial_alone.json()["error"]["param"] == "partial_images"
    assert url_stream.json()["error"]["param"] == "response_format"
    assert too_many.json()["error"]["param"] == "partial_images"
    assert {partial_alone.status_code, url_stream.status_code, too_many.status_code} == {400}
