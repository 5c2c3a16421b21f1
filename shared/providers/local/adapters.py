"""LoRA adapters per request (issue 30): loaded once into a pipeline, switched per call.

A request names adapters of its model (``GenerationParams.lora``, checked at the
edge against the entry's ``adapters``). ``activate`` is called right before each
pipeline call, holding the device (no other call may switch adapters between it
and the call): an adapter the pipeline does not hold yet is loaded
(``load_lora_weights``, once per loaded pipeline: what is loaded is read from the
pipeline's own modules, ``get_list_adapters``), then the call's set is switched on
at its scales (``set_adapters``), or every adapter off for a call without any
(``disable_lora``), which then gives exactly the images of a pipeline that never
loaded one.

Image-to-image and inpainting pipelines are made from the text-to-image one with
``from_pipe`` (``pipelines.py``) and share its modules: an adapter loaded through
one is held by all, and each sees it through ``get_list_adapters``.

Unfused, by measurement (tiny pipeline, CPU, one thread, 6 steps at 64x64, one
adapter of rank 4 on every attention projection; the least of 20 calls each): a
call of a pipeline that never loaded an adapter 102 ms, with adapters loaded and
off 106 ms, with one on 120 ms unfused against 108 ms fused; a fuse and an
unfuse 10 ms, so a call that switches adapters costs 124 ms unfused, 119 ms
fused. Fusing would save up to a tenth of a call, but an unfused weight is not
the weight it was (W + dW - dW differs in the last bits: after 20 fuse/unfuse
cycles the plain image differed by 9e-7), so a call without adapters would no
longer give the plain model's images, and the same request and seed would give
bytes that depend on which adapters the calls before it fused. ``set_adapters``
keeps the base weights untouched.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import huggingface_hub

from shared.core.errors import ErrorCode, PermanentProviderError
from shared.core.settings import get_settings
from shared.jobs.schemas import LoraChoice
from shared.providers.local import pipelines
from shared.registry import DiffusersModel

log = logging.getLogger(__name__)

# One adapter as the batching writer may hand it: a stored choice, or (name, scale).
Choice = LoraChoice | tuple[str, float]


def activate(pipe: Any, spec: DiffusersModel, lora: Sequence[Choice]) -> None:
    """Switch ``pipe`` to the adapters ``lora`` names at their scales, loading any
    it does not hold yet; none named: every adapter off. Call it holding the
    device, right before the pipeline call. A load that fails raises
    ``PermanentProviderError`` (``model_unavailable``) naming model and adapter."""
    chosen = [_pair(choice) for choice in lora]
    held = loaded(pipe)
    grew = False
    for name, _ in chosen:
        if name not in held:
            _load(pipe, spec, name)
            held.add(name)
            grew = True
    if grew:
        _account(spec)
    if chosen:
        pipe.set_adapters([name for name, _ in chosen], adapter_weights=[s for _, s in chosen])
        pipe.enable_lora()
    elif held:
        pipe.disable_lora()


def loaded(pipe: Any) -> set[str]:
    """The adapters ``pipe``'s modules hold (shared with the pipelines made from it)."""
    get = getattr(pipe, "get_list_adapters", None)
    if get is None:  # a pipeline class without LoRA support holds none
        return set()
    return {name for names in get().values() for name in names}


def _pair(choice: Choice) -> tuple[str, float]:
    if isinstance(choice, LoraChoice):
        return choice.name, choice.scale
    name, scale = choice
    return name, float(scale)


def _load(pipe: Any, spec: DiffusersModel, name: str) -> None:
    adapter = spec.adapters.get(name)
    if adapter is None:  # the edge checks names against the entry: a stale job's
        _fail(spec, name, f"the model has no adapter '{name}'")
    if not hasattr(pipe, "load_lora_weights"):
        _fail(spec, name, f"{type(pipe).__name__} does not take LoRA adapters")
    source, options = _source(spec, name, adapter.path)
    log.info("model %s: loading adapter %s from %s", spec.name, name, adapter.path)
    try:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first that a model holding
            # several is unusual: holding several is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            # safetensors only: a pickled checkpoint runs code when read.
            pipe.load_lora_weights(source, adapter_name=name, use_safetensors=True, **options)
    except Exception as exc:
        # A missing or unreadable file, keys that fit no module of this model, not
        # in the Hub cache: diffusers and peft raise many kinds; each means this.
        _forget(pipe, name)
        _fail(spec, name, f"loading {adapter.path} failed: {_first_line(exc)}")
    if name not in loaded(pipe):
        _fail(spec, name, f"{adapter.path} holds no weights for this model's modules")


def _source(spec: DiffusersModel, name: str, path: str) -> tuple[str, dict[str, Any]]:
    """(what load_lora_weights reads, its options): a file as its folder and name; a
    folder (save_lora_weights' output); or a Hub id, downloaded on first use, or
    where IMAGEGEN_HF_OFFLINE is set its snapshot in the local cache (diffusers
    cannot pick a Hub id's weight file offline: it lists the repository's files)."""
    where = Path(path).expanduser()
    if where.is_file():
        if where.suffix != ".safetensors":  # diffusers would read a pickle named so
            _fail(spec, name, f"its file {path} is not a .safetensors file")
        return str(where.parent), {"weight_name": where.name, "local_files_only": True}
    if where.is_dir():
        return str(where), {"local_files_only": True}
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        _fail(spec, name, f"its path {path} is not a file or a folder")
    if not get_settings().hf_offline:
        return path, {}
    try:
        return huggingface_hub.snapshot_download(path, local_files_only=True), {
            "local_files_only": True
        }
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or a bad id
        _fail(spec, name, f"{path} is not in the local Hugging Face cache ({_first_line(exc)})")


def _forget(pipe: Any, name: str) -> None:
    """Take out what a failed load left of ``name`` (peft may have added its layers
    before the failure), so the next call finds the pipeline as it was."""
    if name in loaded(pipe):
        try:
            pipe.delete_adapters(name)
        except Exception:  # the load's own error is the one to report
            log.exception("adapter %s: cleaning up after a failed load failed", name)


def _account(spec: DiffusersModel) -> None:
    """The model's size measured again: its adapters take memory of the budget."""
    pipelines.account(spec)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].rstrip(".") if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _fail(spec: DiffusersModel, name: str, why: str) -> NoReturn:
    raise PermanentProviderError(
        f"The model '{spec.name}' is not available with adapter '{name}': {why}.",
        code=ErrorCode.model_unavailable,
    )
