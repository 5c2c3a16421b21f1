"""Local models within a device's memory budget (issue 30): loaded on demand,
unloaded least recently used when another model needs the room, never while in
use; preloaded ones kept over the others; one too big for the budget refused. On
the CPU, with the tiny pipeline (about 137 KiB of weights) under several names."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from shared.core.errors import PermanentProviderError
from shared.core.settings import get_settings
from shared.providers.local import pipelines
from shared.providers.local.pipelines import account, loaded_models, preload, unload_all, using
from shared.registry import DiffusersModel
from tests.support.tiny_diffusion import build_tiny_sd

KIB = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def size(model_dir: Path) -> int:
    """The tiny pipeline's weights, measured as the budget counts them."""
    with _clean():
        with using(spec(model_dir, "measure")):
            pass
        return loaded_models()["measure"]


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Sets IMAGEGEN_GPU_MEMORY_BYTES (the CPU's only budget) for the test; every
    model unloaded before and after it."""

    def set_budget(nbytes: int) -> None:
        monkeypatch.setenv("IMAGEGEN_GPU_MEMORY_BYTES", str(nbytes))
        get_settings.cache_clear()

    with _clean():
        yield set_budget
    # Before monkeypatch's own undo, which comes after this: no later test may
    # find the budget in the cached settings.
    monkeypatch.delenv("IMAGEGEN_GPU_MEMORY_BYTES")
    get_settings.cache_clear()


class _clean:
    def __enter__(self) -> None:
        unload_all()

    def __exit__(self, *_: object) -> None:
        unload_all()


def spec(path: Path, name: str, preload: bool = False) -> DiffusersModel:
    return DiffusersModel.model_validate(
        {
            "name": name,
            "provider": "diffusers",
            "model_path": str(path),
            "device": "cpu",
            "steps": 3,
            "preload": preload,
            "capabilities": {"sizes": ["64x64"]},
        }
    )


def image(model: DiffusersModel, seed: int = 7) -> bytes:
    with using(model) as (pipe, _device):
        out = pipe(
            prompt="a red fox",
            width=32,
            height=32,
            num_inference_steps=1,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    return bytes(numpy.asarray(out.images).tobytes())


def test_loading_a_second_model_past_the_budget_unloads_the_first_and_frees_it(
    model_dir: Path, size: int, budget: Any
) -> None:
    budget(size * 3 // 2)  # room for one
    a, b = spec(model_dir, "model-a"), spec(model_dir, "model-b")
    before = image(a)
    with using(a, "image2image") as (derived, _):  # from_pipe: the same weights
        unet = weakref.ref(derived.unet)
    del derived
    assert loaded_models() == {"model-a": size}  # the derived task costs nothing more
    with using(b):
        pass
    assert loaded_models() == {"model-b": size}
    gc.collect()
    assert unet() is None  # no reference left: its memory is free
    assert image(a) == before  # loaded again (b unloaded): the same bytes, same seed
    assert loaded_models() == {"model-a": size}


def test_the_least_recently_used_model_is_the_one_unloaded(
    model_dir: Path, size: int, budget: Any
) -> None:
    budget(size * 5 // 2)  # room for two
    a, b, c = (spec(model_dir, f"lru-{x}") for x in "abc")
    for model in (a, b, a):
        with using(model):
            pass
    with using(c):
        pass
    assert set(loaded_models()) == {"lru-a", "lru-c"}


def test_a_model_in_use_is_not_unloaded_the_load_waits_for_its_call_to_end(
    model_dir: Path, size: int, budget: Any
) -> None:
    budget(size * 3 // 2)
    a, b = spec(model_dir, "busy-a"), spec(model_dir, "busy-b")
    order: list[str] = []
    release_b = threading.Event()

    def call(model: DiffusersModel, then: threading.Event | None = None) -> None:
        with using(model):
            order.append(model.name)
            if then is not None:
                then.wait(10)

    with using(a):
        loader = threading.Thread(target=call, args=(b, release_b))
        loader.start()
        time.sleep(0.5)
        assert order == []  # b waits for room: a is in use
        assert list(loaded_models()) == ["busy-a"]
        # A new call for a waits behind b's load, or a busy model would never
        # give its room.
        again = threading.Thread(target=call, args=(a,))
        again.start()
        time.sleep(0.3)
        assert order == []
    deadline = time.monotonic() + 10
    while not order and time.monotonic() < deadline:
        time.sleep(0.02)
    assert order == ["busy-b"]  # b loaded once a's call ended; a's new call still waits
    assert list(loaded_models()) == ["busy-b"]
    release_b.set()  # b's call ends: a loads again in its place
    for thread in (loader, again):
        thread.join(10)
    assert order == ["busy-b", "busy-a"]
    assert list(loaded_models()) == ["busy-a"]


def test_a_load_that_waits_too_long_for_models_in_use_is_refused_naming_them(
    model_dir: Path, size: int, budget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget(size * 3 // 2)
    monkeypatch.setattr(pipelines, "ROOM_WAIT_SECONDS", 0.2)
    with using(spec(model_dir, "held")), pytest.raises(PermanentProviderError) as caught:
        pipelines.pipeline(spec(model_dir, "wanted"))
    assert caught.value.code == "model_unavailable"
    assert "'wanted'" in caught.value.message
    assert "held" in caught.value.message
    assert list(loaded_models()) == ["held"]


def test_preloaded_models_are_kept_over_the_others(model_dir: Path, size: int, budget: Any) -> None:
    budget(size * 5 // 2)  # room for two
    warm, cold, other = (
        spec(model_dir, "warm", preload=True),
        spec(model_dir, "cold"),
        spec(model_dir, "other"),
    )
    assert preload(warm)
    with using(cold):
        pass
    with using(other):  # warm is the least recently used, but preloaded
        pass
    assert set(loaded_models()) == {"warm", "other"}
    with using(other), using(spec(model_dir, "third")):  # other in use: warm must go
        pass
    assert set(loaded_models()) == {"other", "third"}


def test_preload_loads_only_what_fits_beside_what_is_loaded(
    model_dir: Path, size: int, budget: Any
) -> None:
    budget(size * 3 // 2)
    assert preload(spec(model_dir, "first", preload=True))
    assert not preload(spec(model_dir, "second", preload=True))  # left to load on demand
    assert list(loaded_models()) == ["first"]


def test_a_model_bigger_than_the_whole_budget_is_refused_naming_its_size(
    model_dir: Path, size: int, budget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget(100 * KIB)
    big = spec(model_dir, "big")
    for _ in range(2):
        with pytest.raises(PermanentProviderError) as caught:
            pipelines.pipeline(big)
        assert caught.value.code == "model_unavailable"
        assert "'big'" in caught.value.message
        assert f"{size / KIB:.1f} KiB" in caught.value.message
        assert "100.0 KiB" in caught.value.message
        # Refused again without reading its weights: its size is known.
        monkeypatch.setattr(pipelines, "_read", None)
    assert loaded_models() == {}


def test_account_counts_what_was_added_to_a_model_and_makes_room_for_it(
    model_dir: Path, size: int, budget: Any
) -> None:
    budget(size * 5 // 2)
    grown, idle = spec(model_dir, "grown"), spec(model_dir, "idle")
    with using(idle):
        pass
    with using(grown) as (pipe, _):
        # An adapter's weights, say: a module the pipeline now holds.
        pipe.unet.register_buffer("extra", torch.zeros(size // 4))  # float32: size bytes
        assert account(grown) == 2 * size
    assert loaded_models() == {"grown": 2 * size}  # idle unloaded for the growth
