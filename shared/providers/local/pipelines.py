"""Loading diffusers pipelines within a device's memory budget, and sharing a device.

A pipeline is loaded the first time a job needs it (or when a GPU worker starts,
``preload``) and kept while it is used; when another model needs its room on the
device, the least recently used model that no call is using is unloaded (issue 30).
One call at a time runs on a device (``device_lock``): two pipeline calls side by
side on one GPU only split its compute, and double the activation memory.

The budget (``budget``): ``IMAGEGEN_GPU_MEMORY_BYTES`` where set, else
``IMAGEGEN_GPU_MEMORY_FRACTION`` of a CUDA device's memory; none on a CPU or Apple
device without bytes set. It counts the models' weights (every parameter and
buffer of their modules); what it leaves free is for the activations of the calls.
Eviction order: models without ``preload`` first, then preloaded ones, each least
recently used first (preload keeps a model warm, never blocks another from loading).

Tasks: ``text2image`` loads the model; the tasks the edits issue adds
(``image2image``, ``inpainting``) are made from it with ``from_pipe``, which shares
the loaded weights instead of loading them again: they cost nothing more, and go
with the model when it is unloaded.

Callers run a pipeline inside ``using(spec, task)``: the model counts as in use
(never unloaded) until the block ends. ``pipeline(spec, task)`` hands out the same
pipeline without that mark, for callers that only look at it.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
import transformers
from diffusers.pipelines import pipeline_utils

from shared.core.errors import ErrorCode, PermanentProviderError
from shared.core.settings import get_settings
from shared.registry import DiffusersModel

log = logging.getLogger(__name__)

Task = Literal["text2image", "image2image", "inpainting"]
AUTO_PIPELINES: dict[Task, str] = {
    "text2image": "AutoPipelineForText2Image",
    "image2image": "AutoPipelineForImage2Image",
    "inpainting": "AutoPipelineForInpainting",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns).
DTYPE_ARG = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
# Progress bars would write to a worker's log on every load; jobs report progress.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

# How long a load waits for models in use to make room before it is refused. A
# load waits rather than failing at once: a model is in use only for the length of
# a pipeline call (seconds), and refusing would fail a job permanently for a
# condition that passes by itself. Bounded, so a caller that holds one model while
# asking for another (a deadlock) ends in an error rather than a hung worker.
ROOM_WAIT_SECONDS = 300.0

# Two locks, taken in this order. `_loading`: one load at a time (two would hold
# two copies in host memory, and both could count on the same free room); held for
# a whole load, seconds to minutes. `_state`: the table of loaded models, their
# users and recency, held only for moments, so that a loaded model's calls start
# and end while another model loads. `_room` is notified when a call ends.
_loading = threading.Lock()
_state = threading.Lock()
_room = threading.Condition(_state)
_device_locks: dict[str, threading.Lock] = {}
_ticks = itertools.count()


@dataclass
class _Loaded:
    """One model on one device: its pipelines by task (sharing weights), its size."""

    spec: DiffusersModel
    device: torch.device
    pipes: dict[Task, Any]
    size: int
    users: int = 0  # calls inside `using` now: never unloaded while above 0
    # A load waits for this model's calls to end to unload it: new calls wait for
    # that load instead of starting (else a busy model would keep its room forever).
    draining: bool = False
    last_used: int = field(default_factory=lambda: next(_ticks))


_models: dict[tuple[str, str], _Loaded] = {}
# Each model's size as last measured, by (model, device): a model unloaded once is
# loaded again only after its room is made, and one too big for the budget is
# refused without reading its weights again.
_sizes: dict[tuple[str, str], int] = {}


def resolve_device(spec: DiffusersModel) -> torch.device:
    """The entry's own device if it names one; else the worker's ``--device``; else
    the first GPU, else Apple's, else the CPU. A GPU always with its index (``cuda``
    is ``cuda:<current>``): one device, one lock and one budget, whatever the name."""
    pinned = get_settings().device
    if spec.device != "auto":
        device = torch.device(spec.device)
    elif pinned:
        device = torch.device(pinned)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(spec: DiffusersModel, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it (the range of float32, so no VAE
    overflow to black images as float16 can give), float16 on others, float32 on the
    CPU (half precision there is slow or unsupported)."""
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def device_lock(device: torch.device) -> threading.Lock:
    with _state:
        return _device_locks.setdefault(str(device), threading.Lock())


def budget(device: torch.device) -> int | None:
    """The bytes local models' weights may take on ``device``; None: no budget."""
    settings = get_settings()
    if settings.gpu_memory_bytes is not None:
        return settings.gpu_memory_bytes
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * settings.gpu_memory_fraction)
    return None  # a CPU's or Apple's memory is the host's: no total to take a share of


@contextmanager
def using(spec: DiffusersModel, task: Task = "text2image") -> Iterator[tuple[Any, torch.device]]:
    """The pipeline for ``spec`` and ``task`` and its device, loaded if need be, held
    in use for the block: never unloaded until it ends. Run each pipeline call inside
    one; do not ask for a second model while holding one (its load could wait on
    the first's room)."""
    device = resolve_device(spec)
    loaded, pipe = _acquire(spec, task, device, hold=True)
    try:
        yield pipe, device
    finally:
        with _state:
            loaded.users -= 1
            loaded.last_used = next(_ticks)
            _room.notify_all()


def pipeline(spec: DiffusersModel, task: Task = "text2image") -> tuple[Any, torch.device]:
    """The loaded pipeline for ``spec`` and ``task``, and the device it runs on (not
    marked in use: a call should run inside ``using`` instead)."""
    device = resolve_device(spec)
    _, pipe = _acquire(spec, task, device, hold=False)
    return pipe, device


def preload(spec: DiffusersModel) -> bool:
    """Load at worker start, so the first job does not wait for it, if it fits in
    the room left by the models already loaded (nothing is unloaded for it); one
    that does not fit is loaded on demand later. A model that cannot load is logged
    here, and its jobs fail with the reason. Whether it was loaded."""
    device = resolve_device(spec)
    try:
        with _loading:
            return _load_once(spec, device, evict=False) is not None
    except PermanentProviderError as exc:
        log.error("%s", exc.message)
        return False


def account(spec: DiffusersModel) -> int:
    """Measure a loaded model again (after loading a LoRA adapter into it, say) and
    make the room it now takes, unloading other models not in use; its new size.
    Never waits and never unloads ``spec`` itself: call it holding ``using(spec)``."""
    device = resolve_device(spec)
    key = (spec.name, str(device))
    with _state:
        loaded = _models.get(key)
        if loaded is None:
            return 0
        loaded.size = _device_bytes(loaded.pipes["text2image"], loaded.spec, device)
        limit = budget(device)
        freed = False
        while limit is not None and _used(device) > limit:
            victim = _victim(device, sparing=key)
            if victim is None:
                log.warning(
                    "model %s now takes %s on %s; the models in use leave %s of its %s budget",
                    spec.name,
                    _human(loaded.size),
                    device,
                    _human(limit - _used(device) + loaded.size),
                    _human(limit),
                )
                break
            _unload(victim, f"for {spec.name}'s growth")
            freed = True
        size = loaded.size
    if freed:
        _free(device)
    log.info("model %s on %s measured again: %s", spec.name, device, _human(size))
    return size


def loaded_models(device: torch.device | None = None) -> dict[str, int]:
    """The models loaded now (on ``device``, or on any), by name, with their sizes;
    least recently used first."""
    with _state:
        models = sorted(_models.values(), key=lambda m: m.last_used)
        return {m.spec.name: m.size for m in models if device is None or m.device == device}


def unload_all() -> list[str]:
    """Unload every model no call is using (a test's clean slate, a worker's end);
    the names unloaded."""
    devices: set[torch.device] = set()
    names: list[str] = []
    with _loading, _state:
        for loaded in [m for m in _models.values() if m.users == 0]:
            _unload(loaded, "on request")
            devices.add(loaded.device)
            names.append(loaded.spec.name)
    for device in devices:
        _free(device)
    return names


def _acquire(
    spec: DiffusersModel, task: Task, device: torch.device, hold: bool
) -> tuple[_Loaded, Any]:
    key = (spec.name, str(device))
    with _state:  # already loaded: no wait on another model's load
        loaded = _models.get(key)
        if loaded is not None and not loaded.draining:
            return loaded, _claim(loaded, task, hold)
    with _loading:
        loaded = _load_once(spec, device, evict=True)
        if loaded is None:  # evict=True loads or raises: never here
            raise RuntimeError(f"model {spec.name} neither loaded nor refused")
        with _state:
            return loaded, _claim(loaded, task, hold)


def _claim(loaded: _Loaded, task: Task, hold: bool) -> Any:
    """(Under `_state`.) The model's pipeline for ``task``, made from its loaded one
    the first time; counted in use when ``hold``; its recency refreshed."""
    if task not in loaded.pipes:
        auto = getattr(diffusers, AUTO_PIPELINES[task])
        loaded.pipes[task] = auto.from_pipe(loaded.pipes["text2image"])
    if hold:
        loaded.users += 1
    loaded.last_used = next(_ticks)
    return loaded.pipes[task]


def _load_once(spec: DiffusersModel, device: torch.device, evict: bool) -> _Loaded | None:
    """(Under `_loading`.) The model, loaded on ``device`` unless it is already:
    read into host memory, measured, room made on the device (unloading models not
    in use when ``evict``, else None if it does not fit), then moved there."""
    key = (spec.name, str(device))
    with _state:
        if key in _models:
            return _models[key]
    limit = budget(device)
    known = _sizes.get(key)
    if limit is not None and known is not None and known > limit:
        raise _too_big(spec, device, known, limit)
    pipe = _read(spec, device)
    size = _sizes[key] = _device_bytes(pipe, spec, device)
    if limit is not None and size > limit:
        raise _too_big(spec, device, size, limit)
    if limit is not None:
        if not evict:
            with _state:
                room = limit - _used(device)
            if size > room:
                log.warning(
                    "model %s (%s) not preloaded on %s: %s of its %s budget left; "
                    "it loads when a job needs it",
                    spec.name,
                    _human(size),
                    device,
                    _human(room),
                    _human(limit),
                )
                return None
        elif _make_room(spec, device, size, limit):
            _free(device)
    _place(pipe, spec, device)
    with _state:
        loaded = _models[key] = _Loaded(spec, device, {"text2image": pipe}, size)
        in_all = _used(device)
    log.info(
        "model %s loaded on %s: %s (%s in all%s)",
        spec.name,
        device,
        _human(size),
        _human(in_all),
        f" of a {_human(limit)} budget" if limit is not None else "",
    )
    return loaded


def _make_room(spec: DiffusersModel, device: torch.device, size: int, limit: int) -> bool:
    """(Under `_loading`.) Unload models not in use on ``device`` until ``size`` more
    bytes fit in ``limit``; where every candidate is in use, wait for its calls to
    end (no new call starts on it meanwhile: `draining`). Whether any was unloaded.
    Refused after ROOM_WAIT_SECONDS."""
    deadline = time.monotonic() + ROOM_WAIT_SECONDS
    unloaded = waited = False
    with _state:
        try:
            while _used(device) + size > limit:
                victim = _victim(device)
                if victim is not None:
                    _unload(victim, f"to make room for {spec.name} ({_human(size)})")
                    unloaded = True
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _no_room(spec, device, size, limit)
                if not waited:
                    _drain(device, _used(device) + size - limit)
                    log.info(
                        "model %s waits for room on %s: the models there are in use",
                        spec.name,
                        device,
                    )
                    waited = True
                _room.wait(left)
        finally:
            for loaded in _models.values():
                loaded.draining = False
    return unloaded


def _drain(device: torch.device, need: int) -> None:
    """(Under `_state`.) Mark the models in use that a load will unload, in eviction
    order, until they free ``need`` bytes: their calls finish, no new one starts."""
    for loaded in sorted((m for m in _models.values() if m.device == device), key=_eviction_order):
        if need <= 0:
            return
        loaded.draining = True
        need -= loaded.size


def _eviction_order(loaded: _Loaded) -> tuple[bool, int]:
    """Without ``preload`` before preloaded; least recently used first."""
    return (loaded.spec.preload, loaded.last_used)


def _no_room(spec: DiffusersModel, device: torch.device, size: int, limit: int) -> Exception:
    busy = ", ".join(
        f"{m.spec.name} ({_human(m.size)})" for m in _models.values() if m.device == device
    )
    return PermanentProviderError(
        f"The model '{spec.name}' is not available: it needs {_human(size)} on {device} and "
        f"the models in use there ({busy}) leave {_human(limit - _used(device))} of its "
        f"{_human(limit)} memory budget (waited {ROOM_WAIT_SECONDS:.0f} s for them to end).",
        code=ErrorCode.model_unavailable,
    )


def _victim(device: torch.device, sparing: tuple[str, str] | None = None) -> _Loaded | None:
    """(Under `_state`.) The model to unload next on ``device``, of those not in use
    (``_eviction_order``)."""
    candidates = [
        m for key, m in _models.items() if m.device == device and m.users == 0 and key != sparing
    ]
    return min(candidates, key=_eviction_order, default=None)


def _unload(loaded: _Loaded, why: str) -> None:
    """(Under `_state`.) Drop every reference this module holds to the model (all
    its tasks' pipelines); `_free` then returns the memory."""
    del _models[(loaded.spec.name, str(loaded.device))]
    loaded.pipes.clear()
    log.info(
        "model %s unloaded from %s (%s) %s",
        loaded.spec.name,
        loaded.device,
        _human(loaded.size),
        why,
    )


def _free(device: torch.device) -> None:
    """Return unloaded models' memory: collect the cycles a pipeline's modules form
    (hooks, from_pipe's shared components), then hand CUDA's cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _used(device: torch.device) -> int:
    return sum(m.size for m in _models.values() if m.device == device)


def _device_bytes(pipe: Any, spec: DiffusersModel, device: torch.device) -> int:
    """The bytes a pipeline's weights take on its device: every parameter and buffer
    of its modules, each tensor once. With cpu_offload on a GPU, the weights stay in
    host memory and one module at a time comes to the device: the largest one."""
    seen: set[int] = set()
    sizes: list[int] = []
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        total = 0
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        sizes.append(total)
    if spec.cpu_offload and device.type == "cuda":
        return max(sizes, default=0)
    return sum(sizes)


def _too_big(spec: DiffusersModel, device: torch.device, size: int, limit: int) -> Exception:
    return PermanentProviderError(
        f"The model '{spec.name}' is not available: it needs {_human(size)} on {device}, "
        f"more than its whole memory budget of {_human(limit)} "
        "(IMAGEGEN_GPU_MEMORY_FRACTION or IMAGEGEN_GPU_MEMORY_BYTES; cpu_offload on the "
        "model keeps one part at a time on the GPU).",
        code=ErrorCode.model_unavailable,
    )


def _human(size: int) -> str:
    if abs(size) >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if abs(size) >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.1f} KiB"


def _source(spec: DiffusersModel) -> tuple[str, bool]:
    """(what from_pretrained loads, whether it may only use local files)."""
    path = spec.model_path or ""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return str(folder), True
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise PermanentProviderError(
            f"The model '{spec.name}' is not available: its model_path {path} is not a folder.",
            code=ErrorCode.model_unavailable,
        )
    return path, get_settings().hf_offline


def _read(spec: DiffusersModel, device: torch.device) -> Any:
    """The pipeline in host memory, in the dtype it runs in on ``device``: measured
    there, before any room is taken on the device."""
    source, local_only = _source(spec)
    name = AUTO_PIPELINES["text2image"] if spec.pipeline == "auto" else spec.pipeline
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise PermanentProviderError(
            f"The model '{spec.name}' names a pipeline diffusers does not have: {name}.",
            code=ErrorCode.provider_misconfigured,
        )
    dtype = resolve_dtype(spec, device)
    log.info("loading model %s from %s for %s (%s)", spec.name, source, device, dtype)
    try:
        pipe = cls.from_pretrained(source, local_files_only=local_only, **{DTYPE_ARG: dtype})
    except Exception as exc:
        # Missing or partial files, not in the cache, a folder that is no pipeline,
        # no memory to hold it: diffusers raises many kinds; each means the same here.
        raise _unavailable(spec, f"loading {source} failed", exc) from exc
    if spec.scheduler:
        scheduler = getattr(diffusers, spec.scheduler, None)
        if scheduler is None:
            raise PermanentProviderError(
                f"The model '{spec.name}' names a scheduler diffusers does not have: "
                f"{spec.scheduler}.",
                code=ErrorCode.provider_misconfigured,
            )
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def _place(pipe: Any, spec: DiffusersModel, device: torch.device) -> None:
    """Move a read pipeline onto its device (or hand it to offloading)."""
    try:
        if spec.cpu_offload and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    except torch.cuda.OutOfMemoryError as exc:
        # Memory the budget does not see (another process on the GPU, a budget set
        # above the device's free memory): the job fails naming the reason.
        raise _unavailable(spec, f"moving it to {device} failed", exc) from exc
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)


def _unavailable(spec: DiffusersModel, what: str, exc: Exception) -> PermanentProviderError:
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return PermanentProviderError(
        f"The model '{spec.name}' is not available: {what}: {reason}",
        code=ErrorCode.model_unavailable,
    )
