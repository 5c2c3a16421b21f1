"""The diffusers provider in-process, on a tiny pipeline the test builds (CPU)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy
import pytest
import torch
from PIL import Image

from shared.core.errors import JobCanceled, PermanentProviderError
from shared.core.settings import get_settings
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Inputs
from shared.providers.local import pipelines
from shared.providers.local.diffusion import DiffusersProvider
from shared.registry import DiffusersModel
from tests.support.tiny_diffusion import build_tiny_sd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def spec_for(path: Path | str, name: str = "tiny") -> DiffusersModel:
    return DiffusersModel.model_validate(
        {
            "name": name,
            "provider": "diffusers",
            "model_path": str(path),
            "device": "cpu",
            "steps": 6,
            "quality_steps": {"low": 3, "high": 9},
            "capabilities": {"sizes": ["64x64", "32x48"], "max_n": 4},
        }
    )


def params(**kw: Any) -> GenerationParams:
    return GenerationParams.model_validate(
        {"model": "tiny", "prompt": "a red fox", "n": 1, "size": "64x64", "seed": 7, **kw}
    )


def test_n_images_of_the_requested_size_from_one_call_with_each_step_reported(
    model_dir: Path,
) -> None:
    steps: list[tuple[int, int]] = []
    gen = DiffusersProvider().generate(
        Call(
            spec_for(model_dir), params(n=3, size="32x48"), 3, 0, lambda s, t: steps.append((s, t))
        )
    )
    assert len(gen.images) == 3
    for image in gen.images:
        decoded = Image.open(io.BytesIO(image.data))
        assert (decoded.format, decoded.size) == ("PNG", (32, 48))
    assert steps == [(s, 6) for s in range(1, 7)]  # one call: 6 steps, not 18
    assert len({image.data for image in gen.images}) == 3  # three seeds, three images


def pixels(data: bytes) -> Any:
    return numpy.asarray(Image.open(io.BytesIO(data)), dtype=numpy.int16)


def same_picture(a: bytes, b: bytes) -> bool:
    """Equal up to the rounding of batched kernels (a batch of 3 and of 1 take
    different code paths): at most a few levels on any pixel."""
    return bool(numpy.abs(pixels(a) - pixels(b)).max() <= 3)


def test_the_same_request_and_seed_give_identical_images(model_dir: Path) -> None:
    provider, spec = DiffusersProvider(), spec_for(model_dir)
    three = provider.generate(Call(spec, params(n=3, seed=40), 3, 0))
    again = provider.generate(Call(spec, params(n=3, seed=40), 3, 0))
    other = provider.generate(Call(spec, params(n=3, seed=99), 3, 0))
    assert [i.data for i in three.images] == [i.data for i in again.images]
    assert not same_picture(three.images[0].data, other.images[0].data)
    # Image i is seed + i: made alone with that seed, it is the same picture.
    alone = provider.generate(Call(spec, params(n=1, seed=42), 1, 0))
    assert same_picture(alone.images[0].data, three.images[2].data)
    assert not same_picture(alone.images[0].data, three.images[1].data)


def test_quality_picks_the_number_of_steps(model_dir: Path) -> None:
    seen: list[int] = []
    DiffusersProvider().generate(
        Call(spec_for(model_dir), params(quality="high"), 1, 0, lambda s, t: seen.append(t))
    )
    assert set(seen) == {9}
    assert len(seen) == 9


def test_a_cancel_raised_by_progress_stops_the_loop_at_that_step(model_dir: Path) -> None:
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            raise JobCanceled()

    with pytest.raises(JobCanceled):
        DiffusersProvider().generate(
            Call(spec_for(model_dir), params(quality="high"), 1, 0, progress)
        )
    assert steps == [1, 2]


def test_a_missing_model_folder_fails_with_model_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PermanentProviderError) as caught:
        DiffusersProvider().generate(Call(spec_for(missing, "missing"), params(), 1, 0))
    assert caught.value.code == "model_unavailable"
    assert "'missing'" in caught.value.message
    assert str(missing) in caught.value.message


def test_a_folder_that_is_not_a_pipeline_fails_with_model_unavailable(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(PermanentProviderError) as caught:
        DiffusersProvider().generate(Call(spec_for(tmp_path, "broken"), params(), 1, 0))
    assert caught.value.code == "model_unavailable"


class OutOfMemoryAbove:
    """The loaded pipeline, except that a call for more than ``limit`` images runs out
    of GPU memory (the condition a CPU cannot produce; raised as torch raises it)."""

    def __init__(self, pipe: Any, limit: int) -> None:
        self.pipe, self.limit = pipe, limit
        self.calls: list[int] = []

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(len(kw["prompt"]))
        if len(kw["prompt"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kw)

    def __getattr__(self, name: str) -> Any:  # the rest of the pipeline, as it is
        return getattr(self.pipe, name)


@pytest.fixture
def out_of_memory_above(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> list[OutOfMemoryAbove]:
    made: list[OutOfMemoryAbove] = []
    loaded = pipelines.using

    @contextmanager
    def limited(spec: DiffusersModel, task: Any = "text2image") -> Iterator[Any]:
        with loaded(spec, task) as (pipe, device):
            made.append(OutOfMemoryAbove(pipe, int(spec.name.rsplit("-", 1)[1])))
            yield made[-1], device

    monkeypatch.setattr(pipelines, "using", limited)
    return made


def test_out_of_memory_splits_the_call_in_halves_with_the_same_images(
    model_dir: Path, out_of_memory_above: list[OutOfMemoryAbove]
) -> None:
    expected = DiffusersProvider().generate(Call(spec_for(model_dir, "oom-9"), params(n=3), 3, 0))
    split = DiffusersProvider().generate(Call(spec_for(model_dir, "oom-1"), params(n=3), 3, 0))
    # 3 images: out of memory; 1, then 2: out of memory; 1 and 1.
    assert out_of_memory_above[-1].calls == [3, 1, 2, 1, 1]
    assert len(split.images) == 3
    for got, want in zip(split.images, expected.images, strict=True):
        assert same_picture(got.data, want.data)


def test_out_of_memory_again_fails_naming_the_model_and_size(
    model_dir: Path, out_of_memory_above: list[OutOfMemoryAbove]
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        DiffusersProvider().generate(Call(spec_for(model_dir, "oom-0"), params(n=2), 2, 0))
    assert out_of_memory_above[-1].calls == [2, 1]
    assert caught.value.code == "out_of_memory"
    assert "'oom-0'" in caught.value.message
    assert "64x64" in caught.value.message


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty Hugging Face cache of this test's own; offline as this machine is.
    (huggingface_hub reads HF_HUB_CACHE once, at import: set where it keeps it.)"""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("IMAGEGEN_HF_OFFLINE", "true")
    get_settings.cache_clear()
    yield tmp_path / "hub"
    get_settings.cache_clear()


def test_a_hub_id_loads_from_the_local_cache(model_dir: Path, hf_cache: Path) -> None:
    # The layout huggingface_hub writes: a snapshot folder named by its revision.
    repo = hf_cache / "models--acme--tiny-sd"
    shutil.copytree(model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    gen = DiffusersProvider().generate(Call(spec_for("acme/tiny-sd", "hub-cached"), params(), 1, 0))
    assert Image.open(io.BytesIO(gen.images[0].data)).size == (64, 64)


def test_a_hub_id_missing_from_the_cache_offline_is_model_unavailable(hf_cache: Path) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        DiffusersProvider().generate(
            Call(spec_for("acme/not-cached", "hub-missing"), params(), 1, 0)
        )
    assert caught.value.code == "model_unavailable"
    assert "acme/not-cached" in caught.value.message


def test_partial_images_are_the_latents_decoded_at_even_checkpoints(model_dir: Path) -> None:
    seen: list[tuple[int, int, tuple[int, int]]] = []

    def partials(image_index: int, partial_index: int, png: bytes) -> None:
        seen.append((image_index, partial_index, Image.open(io.BytesIO(png)).size))

    steps: list[int] = []
    DiffusersProvider().generate(
        Call(
            spec_for(model_dir),
            params(n=2, size="32x48", stream=True, partial_images=2),
            2,
            0,
            lambda s, t: steps.append(s),
            partials,
        ),
    )
    # 6 steps, 2 partials: after steps 2 and 4, for each of the 2 images.
    assert sorted(seen) == [(i, k, (32, 48)) for i in (0, 1) for k in (0, 1)]


def input_png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fidelity", "steps", "with_mask", "task"),
    [
        ("high", 3, False, "image2image"),
        ("low", 4, False, "image2image"),
        (None, 4, True, "inpainting"),
    ],
)
def test_an_edit_runs_image_to_image_or_inpainting_over_the_last_steps(
    model_dir: Path, fidelity: str | None, steps: int, with_mask: bool, task: str
) -> None:
    mask = input_png((48, 48), (0, 0, 0, 0), "RGBA") if with_mask else None
    inputs = Inputs([input_png((48, 48), (250, 20, 20))], mask)
    seen: list[tuple[int, int]] = []
    spec = spec_for(model_dir, "tiny-edits")
    gen = DiffusersProvider().generate(
        Call(
            spec,
            params(
                n=2,
                size="32x48",
                operation="edit",
                input_fidelity=fidelity,
                images=["input-0.png"],  # the keys the edge stores them under
                mask="mask.png" if with_mask else None,
            ),
            2,
            0,
            lambda s, t: seen.append((s, t)),
            inputs=inputs,
        ),
    )
    assert [Image.open(io.BytesIO(i.data)).size for i in gen.images] == [(32, 48)] * 2
    # strength 0.5 (high fidelity) or 0.8 of the 6 steps
    assert seen == [(s, steps) for s in range(1, steps + 1)]
    loaded, _ = pipelines.pipeline(spec, task)  # type: ignore[arg-type]
    assert (
        type(loaded).__name__
        == {
            "image2image": "StableDiffusionImg2ImgPipeline",
            "inpainting": "StableDiffusionInpaintPipeline",
        }[task]
    )


def test_a_variation_is_not_a_local_models_operation(model_dir: Path) -> None:
    with pytest.raises(PermanentProviderError, match="not variations"):
        DiffusersProvider().generate(
            Call(
                spec_for(model_dir),
                params(operation="variation"),
                1,
                0,
                inputs=Inputs([input_png((64, 64), (0, 0, 0))]),
            ),
        )
