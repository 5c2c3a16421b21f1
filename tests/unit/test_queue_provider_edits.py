"""Edits and variations on the queue providers (shared/providers/replicate.py, fal.py,
queued.file_fields): the input image and the mask as each provider's document says
(data URIs; Replicate's files API above 1 MB), on the inputs the entry's
``file_inputs`` name, submitted to the fakes (tests/support/fakes/replicate.py,
fal.py), which check them and answer the image edited; and ``file_inputs`` in the
registry."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from shared.core.errors import PermanentProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers import replicate
from shared.providers.base import Call, Generation, Inputs
from shared.providers.fal import FalProvider
from shared.providers.openai_compat import OpenAICompatibleProvider
from shared.providers.replicate import ReplicateProvider
from shared.registry import RegistryError, UpstreamModel, load_registry
from shared.registry.entries import Capabilities
from tests.support.fakes.fal import EXPECTED_KEY, FakeFal
from tests.support.fakes.queue_http import PAINT
from tests.support.fakes.replicate import EXPECTED_TOKEN, FakeReplicate

RED = (200, 20, 20)


def png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def left_half_mask(size: tuple[int, int] = (64, 64)) -> bytes:
    """OpenAI's mask: the left half transparent (to be edited), the rest opaque."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def data_uri_picture(value: Any) -> Image.Image:
    """A file input sent as a data URI, decoded (it must be one)."""
    assert isinstance(value, str)
    head, _, payload = value.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))


def rgb(picture: Image.Image, x: int, y: int) -> tuple[int, ...]:
    pixel = picture.convert("RGB").getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeReplicate, FakeFal]]:
    replicate_fake, fal_fake = FakeReplicate(polls=2).start(), FakeFal(polls=2).start()
    yield replicate_fake, fal_fake
    replicate_fake.stop()
    fal_fake.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def providers(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> tuple[ReplicateProvider, FalProvider]:
    monkeypatch.setenv("REPLICATE_TEST_TOKEN", EXPECTED_TOKEN)
    monkeypatch.setenv("FAL_TEST_KEY", EXPECTED_KEY)
    fetcher = OpenAICompatibleProvider(client)
    return ReplicateProvider(fetcher), FalProvider(fetcher)


def spec(kind: str, base_url: str, model: str, **fields: Any) -> UpstreamModel:
    return UpstreamModel(
        name="editor",
        provider=kind,  # type: ignore[arg-type]
        base_url=base_url,
        api_key_env="REPLICATE_TEST_TOKEN" if kind == "replicate" else "FAL_TEST_KEY",
        upstream_model=model,
        poll_seconds=0.01,
        capabilities=Capabilities(sizes=["auto", "64x64"], max_n=2, edits=True, variations=True),
        **fields,
    )


def edit(
    operation: str = "edit", n: int = 1, size: str = "auto", **fields: Any
) -> GenerationParams:
    return GenerationParams(
        model="editor",
        prompt="paint it",
        n=n,
        size=size,
        operation=operation,  # type: ignore[arg-type]
        images=["in"],
        **fields,
    )


def done(provider: ReplicateProvider | FalProvider, call: Call) -> Generation:
    ref = provider.submit(call)
    for _ in range(20):
        answer = provider.poll(call, ref)
        if isinstance(answer, Generation):
            return answer
    raise AssertionError("never done")


def test_replicate_sends_kontexts_input_image_as_a_data_uri_by_default(
    fakes: tuple[FakeReplicate, FakeFal], providers: tuple[ReplicateProvider, FalProvider]
) -> None:
    fake, _ = fakes
    provider, _ = providers
    kontext = spec("replicate", fake.base_url, "black-forest-labs/flux-kontext-pro")
    call = Call(kontext, edit(seed=5), 1, inputs=Inputs([png((48, 32), RED)]))
    generation = done(provider, call)
    model_input = fake.creates[-1]["body"]["input"]
    assert set(model_input) == {"prompt", "input_image", "seed", "output_format"}  # size auto
    assert data_uri_picture(model_input["input_image"]).size == (48, 32)
    # The model read it: its edit is of our image, at the input's own size.
    picture = Image.open(io.BytesIO(generation.images[0].data))
    assert (picture.size, rgb(picture, 10, 10)) == ((48, 32), RED)


def test_replicate_sends_fills_image_and_our_mask_white_where_edited(
    fakes: tuple[FakeReplicate, FakeFal], providers: tuple[ReplicateProvider, FalProvider]
) -> None:
    fake, _ = fakes
    provider, _ = providers
    fill = spec(
        "replicate",
        fake.base_url,
        "black-forest-labs/flux-fill-pro",
        file_inputs={"image": "image", "mask": "mask"},
    )
    inputs = Inputs([png((64, 64), RED)], left_half_mask())
    generation = done(provider, Call(fill, edit(size="64x64", mask="m"), 1, inputs=inputs))
    sent = data_uri_picture(fake.creates[-1]["body"]["input"]["mask"]).convert("L")
    assert (sent.getpixel((5, 30)), sent.getpixel((60, 30))) == (255, 0)  # white: edit
    picture = Image.open(io.BytesIO(generation.images[0].data))
    assert rgb(picture, 5, 30) == PAINT  # inpainted
    assert rgb(picture, 60, 30) == RED  # kept


def test_replicate_uploads_a_file_over_its_data_uri_limit_and_passes_its_url(
    fakes: tuple[FakeReplicate, FakeFal],
    providers: tuple[ReplicateProvider, FalProvider],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = fakes
    provider, _ = providers
    image = png((64, 64), RED)
    monkeypatch.setattr(replicate, "MAX_DATA_URI_BYTES", len(image))  # this one is over
    kontext = spec("replicate", fake.base_url, "black-forest-labs/flux-kontext-pro")
    generation = done(provider, Call(kontext, edit(), 1, inputs=Inputs([image])))
    url = fake.creates[-1]["body"]["input"]["input_image"]
    (uploaded,) = [u for u in fake.uploads.values() if u["urls"]["get"] == url]
    assert (uploaded["data"], uploaded["content_type"]) == (image, "image/png")
    assert uploaded["name"] == "input.png"
    picture = Image.open(io.BytesIO(generation.images[0].data))
    assert rgb(picture, 10, 10) == RED


def test_a_variation_sends_the_image_alone_without_a_prompt(
    fakes: tuple[FakeReplicate, FakeFal], providers: tuple[ReplicateProvider, FalProvider]
) -> None:
    replicate_fake, fal_fake = fakes
    on_replicate, on_fal = providers
    redux = spec(
        "replicate",
        replicate_fake.base_url,
        "black-forest-labs/flux-redux-dev",
        file_inputs={"image": "redux_image"},
    )
    inputs = Inputs([png((64, 64), RED)])
    done(on_replicate, Call(redux, edit("variation", n=2), 2, inputs=inputs))
    model_input = replicate_fake.creates[-1]["body"]["input"]
    assert "prompt" not in model_input
    assert (model_input["num_outputs"], data_uri_picture(model_input["redux_image"]).size) == (
        2,
        (64, 64),
    )
    fal_redux = spec("fal", fal_fake.base_url, "fal-ai/flux/dev/redux")
    generation = done(on_fal, Call(fal_redux, edit("variation"), 1, inputs=inputs))
    body = fal_fake.submitted[-1]["body"]
    assert "prompt" not in body
    assert data_uri_picture(body["image_url"]).size == (64, 64)
    assert len(generation.images) == 1


def test_fal_sends_fills_image_url_and_mask_url_as_data_uris(
    fakes: tuple[FakeReplicate, FakeFal], providers: tuple[ReplicateProvider, FalProvider]
) -> None:
    _, fake = fakes
    _, provider = providers
    fill = spec(
        "fal",
        fake.base_url,
        "fal-ai/flux-pro/v1/fill",
        file_inputs={"image": "image_url", "mask": "mask_url"},
    )
    inputs = Inputs([png((64, 64), RED)], left_half_mask())
    call = Call(fill, edit(size="64x64", mask="m", output_format="png"), 1, inputs=inputs)
    generation = done(provider, call)
    body = fake.submitted[-1]["body"]
    assert data_uri_picture(body["image_url"]).size == (64, 64)
    mask = data_uri_picture(body["mask_url"]).convert("L")
    assert (mask.getpixel((5, 30)), mask.getpixel((60, 30))) == (255, 0)
    assert body["image_size"] == {"width": 64, "height": 64}
    picture = Image.open(io.BytesIO(generation.images[0].data))
    assert (rgb(picture, 5, 30), rgb(picture, 60, 30)) == (PAINT, RED)


def test_several_images_go_to_a_list_input(
    fakes: tuple[FakeReplicate, FakeFal], providers: tuple[ReplicateProvider, FalProvider]
) -> None:
    _, fake = fakes
    _, provider = providers
    banana = spec(
        "fal", fake.base_url, "fal-ai/nano-banana/edit", file_inputs={"images": "image_urls"}
    )
    images = [png((64, 64), RED), png((32, 32), (0, 200, 0))]
    done(provider, Call(banana, edit(), 1, inputs=Inputs(images)))
    sent = fake.submitted[-1]["body"]["image_urls"]
    assert [data_uri_picture(uri).size for uri in sent] == [(64, 64), (32, 32)]


@pytest.mark.parametrize(
    ("file_inputs", "inputs", "message"),
    [
        (None, Inputs([b"\x89PNG a", b"\x89PNG b"]), "takes one input image, not 2"),
        (None, Inputs([b"\x89PNG a"], b"\x89PNG m"), "takes no mask"),
        (None, Inputs([]), "needs an input image"),
    ],
)
def test_files_a_model_has_no_input_for_are_refused_not_dropped(
    fakes: tuple[FakeReplicate, FakeFal],
    providers: tuple[ReplicateProvider, FalProvider],
    file_inputs: dict[str, str] | None,
    inputs: Inputs,
    message: str,
) -> None:
    replicate_fake, fal_fake = fakes
    for provider, entry in (
        (
            providers[0],
            spec("replicate", replicate_fake.base_url, "black-forest-labs/flux-kontext-pro"),
        ),
        (providers[1], spec("fal", fal_fake.base_url, "fal-ai/flux-pro/kontext")),
    ):
        before = replicate_fake.submits + fal_fake.submits
        with pytest.raises(PermanentProviderError) as caught:
            provider.submit(Call(entry, edit(), 1, inputs=inputs))
        assert message in caught.value.message
        assert caught.value.code == "invalid_value"
        assert replicate_fake.submits + fal_fake.submits == before  # nothing submitted


def _load(tmp_path: Path, entry: dict[str, Any]) -> Any:
    path = tmp_path / "models.yaml"
    caps = {"sizes": ["1024x1024"], "edits": True}
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "capabilities": caps, **entry}]}))
    return load_registry(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"provider": "openai", "file_inputs": {"image": "image"}},
            "model 'm': file_inputs: only a replicate or fal upstream takes it",
        ),
        (
            {"provider": "fal", "file_inputs": {"mask": "mask_url"}},
            "model 'm': file_inputs: give image (an input of one file) or images",
        ),
        (
            {"provider": "replicate", "file_inputs": {"image": "input image"}},
            "model 'm': file_inputs: image: 'input image' is not an input name",
        ),
        (
            {"provider": "replicate", "file_inputs": {"image": "a", "strength": "s"}},
            "model 'm': file_inputs.strength: Extra inputs are not permitted",
        ),
    ],
)
def test_file_inputs_are_refused_in_one_line_naming_the_entry(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, entry)
    assert message in str(caught.value)


def test_file_inputs_load_on_a_queue_kind_and_on_each_deployment(tmp_path: Path) -> None:
    """Input names belong to the upstream model: each deployment names its own."""
    entry = {
        "provider": "fal",
        "upstream_model": "fal-ai/flux-pro/v1/fill",
        "file_inputs": {"image": "image_url", "mask": "mask_url"},
    }
    (only,) = _load(tmp_path, entry).get("m").upstreams()
    assert only.file_inputs is not None
    assert (only.file_inputs.image, only.file_inputs.mask) == ("image_url", "mask_url")
    deployments = {
        "deployments": [
            {
                "id": "on-replicate",
                "provider": "replicate",
                "upstream_model": "black-forest-labs/flux-fill-pro",
                "file_inputs": {"image": "image", "mask": "mask"},
            },
            {"id": "on-fal", "provider": "fal", "upstream_model": "fal-ai/flux-pro/kontext"},
        ]
    }
    spec_ = _load(tmp_path, deployments).get("m")
    first, second = (spec_.served_by(d) for d in spec_.upstreams())
    assert first.file_inputs is not None
    assert (first.file_inputs.image, first.file_inputs.mask) == ("image", "mask")
    assert second.file_inputs is None  # fal's default, Kontext's image_url
