"""Edits and variations through the `openai` package, in-process (procedural)."""

from __future__ import annotations

import base64
import io
import json
import warnings
from typing import Any

import openai
import pytest
from PIL import Image

from tests.service.conftest import Service


def png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def red(picture: Image.Image) -> int:
    pixel = picture.convert("RGB").getpixel((32, 32))
    assert isinstance(pixel, tuple)
    return int(pixel[0])


def decode(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture
def api(service: Service) -> Any:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def test_an_edit_of_one_image_comes_back_in_the_requested_size(api: openai.OpenAI) -> None:
    result = api.images.edit(
        model="procedural",
        image=("in.png", png((64, 64), (200, 10, 10)), "image/png"),
        prompt="make it blue",
        size="64x64",
        response_format="b64_json",
        n=2,
    )
    assert result.data is not None
    pictures = [decode(item.b64_json) for item in result.data]
    assert [p.size for p in pictures] == [(64, 64), (64, 64)]
    # Derived from the input: blended half and half, so its red survives.
    assert all(red(p) >= 100 for p in pictures)


def test_an_edit_with_a_mask_changes_only_its_transparent_pixels(api: openai.OpenAI) -> None:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is to be edited
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    result = api.images.edit(
        model="procedural",
        image=("in.png", png((64, 64), (255, 255, 255)), "image/png"),
        mask=("mask.png", buf.getvalue(), "image/png"),
        prompt="paint the left half",
        size="64x64",
        response_format="b64_json",
    )
    assert result.data is not None
    picture = decode(result.data[0].b64_json).convert("RGB")
    assert picture.getpixel((60, 32)) == (255, 255, 255)  # kept
    assert picture.getpixel((4, 32)) != (255, 255, 255)  # edited


def test_an_edit_of_several_images(api: openai.OpenAI) -> None:
    images = [("a.png", png((64, 64), (255, 0, 0)), "image/png")] + [
        (f"{i}.png", png((32, 32), (0, 0, 255)), "image/png") for i in range(3)
    ]
    result = api.images.edit(model="procedural", image=images, prompt="mix them", size="64x64")
    assert result.data is not None
    assert result.data[0].url


def test_a_variation(api: openai.OpenAI) -> None:
    with warnings.catch_warnings():
        # The openai package marks create_variation deprecated (dall-e-2's), not gone.
        warnings.simplefilter("ignore", DeprecationWarning)
        result = api.images.create_variation(
            model="procedural",
            image=("in.png", png((64, 64), (10, 200, 10)), "image/png"),
            n=2,
            size="64x64",  # type: ignore[arg-type]
            response_format="b64_json",
        )
    assert result.data is not None
    first, second = (decode(item.b64_json) for item in result.data)
    assert first.size == second.size == (64, 64)
    assert first.tobytes() != second.tobytes()


def test_a_streamed_edit_sends_image_edit_events(api: openai.OpenAI) -> None:
    events = list(
        api.images.edit(
            model="procedural",
            image=("in.png", png((64, 64), (1, 2, 3)), "image/png"),
            prompt="streamed edit",
            size="64x64",
            stream=True,
        )
    )
    assert [e.type for e in events] == ["image_edit.completed"]
    assert decode(events[0].b64_json).size == (64, 64)


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({}, {"prompt": "p", "model": "procedural"}, "image"),
        ({"image": ("x.txt", b"not an image", "text/plain")}, {"prompt": "p"}, "image"),
        (
            {
                "image": ("in.png", png((64, 64), (0, 0, 0)), "image/png"),
                "mask": ("m.png", png((32, 32), (0, 0, 0, 0), "RGBA"), "image/png"),
            },
            {"prompt": "p", "model": "procedural"},
            "mask",
        ),
        (
            {
                "image": ("in.png", png((64, 64), (0, 0, 0)), "image/png"),
                "mask": ("m.png", png((64, 64), (0, 0, 0)), "image/png"),
            },
            {"prompt": "p", "model": "procedural"},
            "mask",
        ),
        (
            {"image": ("in.png", png((64, 64), (0, 0, 0)), "image/png")},
            {"prompt": "p", "model": "dall-e-3"},
            "model",
        ),
        (
            {"image": ("in.png", png((64, 64), (0, 0, 0)), "image/png")},
            {"prompt": "p", "model": "procedural", "n": "two"},
            "n",
        ),
    ],
)
def test_bad_edits_are_refused_naming_the_param(
    service: Service, files: dict[str, Any], data: dict[str, str], param: str
) -> None:
    with service.client() as http:
        resp = http.post("/v1/images/edits", files=files or None, data=data)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_variation_refuses_a_prompt(service: Service) -> None:
    with service.client() as http:
        resp = http.post(
            "/v1/images/variations",
            files={"image": ("in.png", png((64, 64), (0, 0, 0)), "image/png")},
            data={"prompt": "no", "model": "procedural"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "prompt"


def test_a_batch_of_edits_takes_data_urls_and_file_ids(service: Service) -> None:
    picture = png((64, 64), (0, 120, 240))
    data_url = "data:image/png;base64," + base64.b64encode(picture).decode()

    def line(custom_id: str, body: dict[str, Any]) -> str:
        request = {"custom_id": custom_id, "method": "POST", "url": "/v1/images/edits"}
        return json.dumps({**request, "body": body})

    with service.client() as http:
        uploaded = http.post(
            "/v1/files",
            data={"purpose": "vision"},
            files={"file": ("in.png", picture, "image/png")},
        ).json()
        lines = [
            line("from-data-url", {"model": "procedural", "prompt": "a", "image": data_url}),
            line(
                "from-file-id",
                {"model": "procedural", "prompt": "b", "image": [uploaded["id"]], "n": 2},
            ),
            line("no-image", {"model": "procedural", "prompt": "c"}),
            line("bad-image", {"model": "procedural", "prompt": "d", "image": "http://x/y.png"}),
        ]
        source = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("edits.jsonl", "\n".join(lines).encode(), "application/jsonl")},
        ).json()
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": source["id"],
                "endpoint": "/v1/images/edits",
                "completion_window": "24h",
            },
        ).json()
        assert batch["endpoint"] == "/v1/images/edits", batch
        done = service.wait_for(f"/v1/batches/{batch['id']}", lambda b: b["status"] == "completed")
        errors = http.get(f"/v1/files/{done['error_file_id']}/content").text
        assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}, errors
        output = http.get(f"/v1/files/{done['output_file_id']}/content").text
        errors = http.get(f"/v1/files/{done['error_file_id']}/content").text
    results = {r["custom_id"]: r for r in map(json.loads, output.splitlines())}
    assert len(results["from-data-url"]["response"]["body"]["data"]) == 1
    assert len(results["from-file-id"]["response"]["body"]["data"]) == 2
    failed = {r["custom_id"]: r for r in map(json.loads, errors.splitlines())}
    assert set(failed) == {"no-image", "bad-image"}
    assert "'image'" in json.dumps(failed["no-image"])


@pytest.mark.parametrize("field", ["image", "mask"])
def test_an_image_bomb_is_refused_before_it_is_decoded(service: Service, field: str) -> None:
    """A 13000x13000 PNG of a few kilobytes (169 Mpx: 676 MiB once decoded)."""
    from tests.support.bombs import png_declaring

    files = {"image": ("in.png", png((64, 64), (0, 0, 0)), "image/png")}
    files[field] = (f"{field}.png", png_declaring(13000, 13000), "image/png")
    with service.client() as http:
        resp = http.post("/v1/images/edits", files=files, data={"prompt": "p"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("image_too_large", field)
