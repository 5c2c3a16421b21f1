"""LoRA adapters switched per call (shared/providers/local/adapters.py), on the tiny
pipeline and tiny LoRAs the test builds (CPU, nothing downloaded)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
from PIL import Image

from shared.core.errors import PermanentProviderError
from shared.core.settings import get_settings
from shared.jobs.schemas import LoraChoice
from shared.providers.local import adapters
from shared.registry import DiffusersModel
from tests.support.tiny_diffusion import build_tiny_lora, build_tiny_sd


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-lora")
    model = build_tiny_sd(folder)
    build_tiny_lora(model, folder / "lora-a", seed=1)
    build_tiny_lora(model, folder / "lora-b", seed=2)
    return folder


@pytest.fixture
def spec(folder: Path) -> DiffusersModel:
    return DiffusersModel.model_validate(
        {
            "name": "tiny-lora",
            "provider": "diffusers",
            "model_path": str(folder / "model"),
            "device": "cpu",
            "capabilities": {"sizes": ["32x32"]},
            "adapters": {
                # A folder of save_lora_weights, and the .safetensors file itself.
                "a": {"path": str(folder / "lora-a")},
                "b": {"path": str(folder / "lora-b" / "pytorch_lora_weights.safetensors")},
                "gone": {"path": str(folder / "no-such-lora")},
                "empty": {"path": str(folder / "model")},
                # A pickle runs code when read: refused, whatever it holds.
                "pickled": {"path": str(folder / "lora-a.bin")},
            },
        }
    )


def fresh(folder: Path) -> Any:
    pipe = AutoPipelineForText2Image.from_pretrained(str(folder / "model"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe: Any, **extra: Any) -> bytes:
    """The raw pixels (floats, before any rounding to PNG) of a fixed seed's image."""
    args = extra or {"width": 32, "height": 32}
    out = pipe(
        prompt="a red fox",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **args,
    )
    return bytes(out.images[0].tobytes())


def counting(pipe: Any) -> list[str]:
    """The adapters ``pipe`` loads from now on, in order."""
    loads: list[str] = []
    real: Callable[..., Any] = pipe.load_lora_weights

    def load(source: Any, adapter_name: str, **kw: Any) -> Any:
        loads.append(adapter_name)
        return real(source, adapter_name=adapter_name, **kw)

    pipe.load_lora_weights = load
    return loads


def lora(*choices: tuple[str, float]) -> list[LoraChoice]:
    return [LoraChoice(name=name, scale=scale) for name, scale in choices]


def test_an_adapter_changes_the_image_and_switching_it_off_gives_the_plain_bytes(
    folder: Path, spec: DiffusersModel
) -> None:
    plain = image(fresh(folder))  # a pipeline that never loaded an adapter
    pipe = fresh(folder)
    loads = counting(pipe)

    adapters.activate(pipe, spec, lora(("a", 1.0)))
    with_a = image(pipe)
    adapters.activate(pipe, spec, [])
    none = image(pipe)
    adapters.activate(pipe, spec, lora(("a", 1.0)))
    again = image(pipe)
    adapters.activate(pipe, spec, lora(("a", 0.0)))
    scale_0 = image(pipe)

    assert with_a != plain
    assert none == plain
    assert again == with_a  # nothing leaks between calls
    assert scale_0 == plain
    assert loads == ["a"]  # loaded once, switched after


def test_two_adapters_at_once_and_their_scales(folder: Path, spec: DiffusersModel) -> None:
    pipe = fresh(folder)
    loads = counting(pipe)
    adapters.activate(pipe, spec, lora(("a", 1.0)))
    only_a = image(pipe)
    adapters.activate(pipe, spec, lora(("b", 1.0)))
    only_b = image(pipe)
    adapters.activate(pipe, spec, lora(("a", 1.0), ("b", 1.0)))
    both = image(pipe)
    adapters.activate(pipe, spec, lora(("a", 1.0), ("b", 0.5)))
    half_b = image(pipe)
    # The batching writer hands (name, scale) pairs: the same switch.
    adapters.activate(pipe, spec, [("a", 1.0), ("b", 1.0)])

    assert len({only_a, only_b, both, half_b}) == 4
    assert image(pipe) == both
    assert loads == ["a", "b"]
    assert adapters.loaded(pipe) == {"a", "b"}


def test_pipelines_made_with_from_pipe_share_the_loaded_adapters(
    folder: Path, spec: DiffusersModel
) -> None:
    text2image = fresh(folder)
    image2image = AutoPipelineForImage2Image.from_pipe(text2image)
    loads = counting(text2image)
    edit_loads = counting(image2image)
    start = Image.new("RGB", (32, 32), (200, 40, 40))

    def edit() -> bytes:
        return image(image2image, image=start, strength=0.8)

    plain_edit = edit()
    adapters.activate(text2image, spec, lora(("a", 1.0)))
    adapters.activate(image2image, spec, lora(("a", 1.0)))
    with_a = edit()
    adapters.activate(image2image, spec, [])
    assert image(text2image) == image(fresh(folder))  # switched off for both

    assert (loads, edit_loads) == (["a"], [])  # held once, by the shared modules
    assert with_a != plain_edit
    assert edit() == plain_edit


def test_an_adapter_that_cannot_load_is_model_unavailable_naming_it(
    folder: Path, spec: DiffusersModel
) -> None:
    pipe = fresh(folder)
    plain = image(pipe)
    (folder / "lora-a.bin").write_bytes(b"a pickled checkpoint")
    refusals = (
        ("gone", "is not a file or a folder"),
        ("empty", "failed"),
        ("pickled", "is not a .safetensors file"),
    )
    for name, why in refusals:
        with pytest.raises(PermanentProviderError) as caught:
            adapters.activate(pipe, spec, lora((name, 1.0)))
        assert caught.value.code == "model_unavailable"
        message = caught.value.message
        assert "'tiny-lora'" in message
        assert f"adapter '{name}'" in message
        assert why in message
        assert "\n" not in message
    # The pipeline is as it was: no half-loaded adapter, plain images.
    assert adapters.loaded(pipe) == set()
    adapters.activate(pipe, spec, [])
    assert image(pipe) == plain


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty Hugging Face cache of this test's own, offline as this machine is."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("IMAGEGEN_HF_OFFLINE", "true")
    get_settings.cache_clear()
    yield tmp_path / "hub"
    get_settings.cache_clear()


def test_a_hub_id_loads_from_the_local_cache_offline(
    folder: Path, spec: DiffusersModel, hf_cache: Path
) -> None:
    repo = hf_cache / "models--acme--tiny-lora"
    shutil.copytree(folder / "lora-a", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    hub = spec.model_copy(
        update={
            "adapters": {
                **spec.adapters,
                "hub": spec.adapters["a"].model_copy(update={"path": "acme/tiny-lora"}),
            }
        }
    )
    pipe = fresh(folder)
    adapters.activate(pipe, hub, lora(("a", 1.0)))
    with_a = image(pipe)
    adapters.activate(pipe, hub, lora(("hub", 1.0)))
    assert image(pipe) == with_a  # the same weights, through the cache
    with pytest.raises(PermanentProviderError) as caught:
        adapters.activate(
            pipe,
            hub.model_copy(
                update={
                    "adapters": {
                        "x": spec.adapters["a"].model_copy(update={"path": "acme/not-cached"})
                    }
                }
            ),
            lora(("x", 1.0)),
        )
    assert caught.value.code == "model_unavailable"
    assert "not in the local Hugging Face cache" in caught.value.message
