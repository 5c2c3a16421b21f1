"""The ``comfyui`` provider's edits: a workflow's loader inputs checked at load with
the model's capabilities, and against the fake server over HTTP: the image and mask
uploaded once per submit (a transparent mask where none), named by their content,
their names set on the LoadImage and LoadImageMask nodes and recorded, the images
made from the uploaded one; what an edit model cannot do refused."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from shared.core.errors import PermanentProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Generation, Inputs
from shared.providers.comfyui import ComfyUIProvider
from shared.registry import RegistryError, UpstreamModel, load_registry
from tests.support.fakes.comfyui import (
    EDIT_INPUTS,
    EDIT_WORKFLOW_FILE,
    INPUTS,
    WORKFLOW_FILE,
    FakeComfyUI,
    load_workflow,
)

CAPS = {"sizes": ["64x64"], "max_n": 4, "seed": True, "edits": True}


@pytest.fixture
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI(load_workflow(EDIT_WORKFLOW_FILE), EDIT_INPUTS).start()
    yield server
    server.stop()


@pytest.fixture
def provider() -> Iterator[ComfyUIProvider]:
    with httpx.Client(timeout=5) as client:
        yield ComfyUIProvider(client)


def _spec(base_url: str, **fields: Any) -> UpstreamModel:
    entry = {
        "name": "comfy-edit",
        "provider": "comfyui",
        "base_url": base_url,
        "workflow": str(EDIT_WORKFLOW_FILE),
        "workflow_inputs": EDIT_INPUTS,
        "poll_seconds": 0.01,
        "capabilities": CAPS,
        **fields,
    }
    return UpstreamModel.model_validate(entry)


def _picture(size: tuple[int, int], fmt: str = "PNG", alpha: int | None = None) -> bytes:
    mode, colour = ("RGBA", (0, 0, 0, alpha)) if alpha is not None else ("RGB", (200, 40, 40))
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _edit(
    spec: UpstreamModel, images: list[bytes], mask: bytes | None = None, count: int = 1
) -> Call:
    params = GenerationParams(
        model="comfy-edit", prompt="a red door", n=count, size="64x64", operation="edit"
    )
    return Call(spec, params, count, inputs=Inputs(images, mask))


def _until_done(provider: ComfyUIProvider, call: Call, ref: dict[str, Any]) -> Generation:
    for _ in range(20):
        answer = provider.poll(call, ref)
        if isinstance(answer, Generation):
            return answer
    raise AssertionError("never done")


# --- the registry ------------------------------------------------------------------------


def _load(tmp_path: Path, inputs: dict[str, str], **caps: Any) -> Any:
    shutil.copy(EDIT_WORKFLOW_FILE, tmp_path / "edit.json")
    entry = {
        "name": "comfy-edit",
        "provider": "comfyui",
        "base_url": "http://comfy.test:8188",
        "workflow": "edit.json",
        "workflow_inputs": inputs,
        "capabilities": {**CAPS, **caps},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return load_registry(path)


@pytest.mark.parametrize(
    ("inputs", "caps", "message"),
    [
        (
            {**EDIT_INPUTS, "image": "6.text"},
            {},
            "workflow_inputs: image: takes the image input of a LoadImage node, not 6.text "
            "(CLIPTextEncode)",
        ),
        (
            {**EDIT_INPUTS, "mask": "11.channel"},
            {},
            "workflow_inputs: mask: takes the image input of a LoadImageMask or LoadImage node",
        ),
        (
            {k: v for k, v in EDIT_INPUTS.items() if k not in ("image", "mask")},
            {},
            "workflow_inputs: image: a model with capabilities.edits needs the LoadImage",
        ),
        (
            {k: v for k, v in EDIT_INPUTS.items() if k != "image"},
            {},
            "workflow_inputs: mask: a mask needs the image it masks",
        ),
        (
            EDIT_INPUTS,
            {"edits": False},
            "workflow_inputs: image: the workflow edits an image; set capabilities.edits",
        ),
        (EDIT_INPUTS, {"variations": True}, "capabilities.variations: a comfyui workflow"),
    ],
)
def test_an_edits_inputs_are_checked_at_load(
    tmp_path: Path, inputs: dict[str, str], caps: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, inputs, **caps)
    assert f"model 'comfy-edit': {message}" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_mask_read_from_another_channel_than_alpha_is_refused_at_load(tmp_path: Path) -> None:
    workflow = load_workflow(EDIT_WORKFLOW_FILE)
    workflow["11"]["inputs"]["channel"] = "red"
    (tmp_path / "red.json").write_text(json.dumps(workflow))
    entry = {
        "name": "comfy-edit",
        "provider": "comfyui",
        "base_url": "http://comfy.test:8188",
        "workflow": "red.json",
        "workflow_inputs": EDIT_INPUTS,
        "capabilities": CAPS,
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    with pytest.raises(RegistryError, match="reads channel 'red'; our masks mark what to edit"):
        load_registry(path)
    assert _load(tmp_path, EDIT_INPUTS).get("comfy-edit").capabilities.edits


# --- an edit against the server ---------------------------------------------------------------


def test_an_edit_uploads_its_image_and_mask_once_and_the_loaders_name_them(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    image, mask = _picture((80, 48)), _picture((80, 48), alpha=0)
    call = _edit(_spec(fake.base_url), [image], mask, count=2)  # a prompt per image
    ref = provider.submit(call)
    assert [(u["data"], u["subfolder"], u["type"]) for u in fake.uploads] == [
        (image, "imagegen", "input"),
        (mask, "imagegen", "input"),
    ]
    names = [f"imagegen/{u['name']}" for u in fake.uploads]
    assert ref["inputs"] == {"image": names[0], "mask": names[1]}
    assert len(fake.workflows) == 2
    for body in fake.workflows:
        graph = body["prompt"]
        assert (graph["10"]["inputs"]["image"], graph["11"]["inputs"]["image"]) == tuple(names)
        assert graph["6"]["inputs"]["text"] == "a red door"
    done = _until_done(provider, call, ref)
    sizes = [Image.open(io.BytesIO(made.data)).size for made in done.images]
    assert sizes == [(80, 48)] * 2  # made from the uploaded image (the workflow's latent)


def test_a_file_uploaded_again_is_the_same_file(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    image = _picture((64, 64), "JPEG")
    spec = _spec(fake.base_url)
    first = provider.submit(_edit(spec, [image]))
    second = provider.submit(_edit(spec, [image]))  # a submit made again after a crash
    assert first["inputs"] == second["inputs"]
    assert first["inputs"]["image"].endswith(".jpeg")
    assert len(fake.inputs_folder) == 3  # example.png, the image, the mask


def test_without_a_mask_the_whole_image_is_edited(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    provider.submit(_edit(_spec(fake.base_url), [_picture((72, 40))]))
    mask = Image.open(io.BytesIO(fake.uploads[1]["data"]))
    assert (mask.size, mask.mode) == ((72, 40), "RGBA")
    assert mask.getchannel("A").getextrema() == (0, 0)  # transparent: edit everywhere


def test_what_an_edit_model_cannot_do_is_refused_before_anything_is_sent(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    spec = _spec(fake.base_url)
    params = GenerationParams(model="comfy-edit", prompt="a door", n=1, size="64x64")
    with pytest.raises(PermanentProviderError, match=r"edits an image \(/v1/images/edits\)"):
        provider.submit(Call(spec, params, 1))
    with pytest.raises(PermanentProviderError, match="edits one image"):
        provider.submit(_edit(spec, [_picture((64, 64)), _picture((64, 64))]))
    image_to_image = {k: v for k, v in EDIT_INPUTS.items() if k != "mask"}
    unmasked = _spec(fake.base_url, workflow_inputs=image_to_image)
    with pytest.raises(PermanentProviderError, match="takes no mask: its workflow maps none"):
        provider.submit(_edit(unmasked, [_picture((64, 64))], _picture((64, 64), alpha=0)))
    plain = UpstreamModel.model_validate(
        {
            **spec.model_dump(exclude_unset=True),
            "workflow": str(WORKFLOW_FILE),
            "workflow_inputs": INPUTS,
            "capabilities": {**CAPS, "edits": False},
        }
    )
    with pytest.raises(PermanentProviderError, match="makes images from a prompt only"):
        provider.submit(_edit(plain, [_picture((64, 64))]))
    assert (fake.uploads, fake.workflows) == ([], [])
