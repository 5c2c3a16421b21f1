"""Loading diffusers pipelines once per process and device, and sharing a device.

A pipeline is loaded the first time a job needs it (or when a GPU worker starts,
``preload``) and kept for the life of the process. One call at a time runs on a
device (``device_lock``): two pipeline calls side by side on one GPU only split
its compute, and double the activation memory.

Tasks: ``text2image`` loads the model; the tasks the edits issue adds
(``image2image``, ``inpainting``) are made from it with ``from_pipe``, which shares
the loaded weights instead of loading them again.
"""

from __future__ import annotations

import logging
import threading
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

_loading = threading.Lock()
_pipelines: dict[tuple[str, str, str], Any] = {}
_device_locks: dict[str, threading.Lock] = {}


def resolve_device(spec: DiffusersModel) -> torch.device:
    """The entry's own device if it names one; else the worker's ``--device``; else
    the first GPU, else Apple's, else the CPU."""
    pinned = get_settings().device
    if spec.device != "auto":
        return torch.device(spec.device)
    if pinned:
        return torch.device(pinned)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    with _loading:
        return _device_locks.setdefault(str(device), threading.Lock())


def pipeline(spec: DiffusersModel, task: Task = "text2image") -> tuple[Any, torch.device]:
    """The loaded pipeline for ``spec`` and ``task``, and the device it runs on."""
    device = resolve_device(spec)
    base_key = (spec.name, str(device), "text2image")
    key = (spec.name, str(device), task)
    with _loading:  # one load at a time: two would hold two copies in memory
        if base_key not in _pipelines:
            _pipelines[base_key] = _load(spec, device)
        if key not in _pipelines:
            auto = getattr(diffusers, AUTO_PIPELINES[task])
            _pipelines[key] = auto.from_pipe(_pipelines[base_key])
        return _pipelines[key], device


def preload(spec: DiffusersModel) -> None:
    """Load at worker start, so the first job does not wait for it; a model that
    cannot load is logged here, and its jobs fail with the reason."""
    try:
        _, device = pipeline(spec)
        log.info("model %s loaded on %s", spec.name, device)
    except PermanentProviderError as exc:
        log.error("%s", exc.message)


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


def _load(spec: DiffusersModel, device: torch.device) -> Any:
    source, local_only = _source(spec)
    name = AUTO_PIPELINES["text2image"] if spec.pipeline == "auto" else spec.pipeline
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise PermanentProviderError(
            f"The model '{spec.name}' names a pipeline diffusers does not have: {name}.",
            code=ErrorCode.provider_misconfigured,
        )
    dtype = resolve_dtype(spec, device)
    log.info("loading model %s from %s on %s (%s)", spec.name, source, device, dtype)
    try:
        pipe = cls.from_pretrained(source, local_files_only=local_only, **{DTYPE_ARG: dtype})
    except Exception as exc:
        # Missing or partial files, not in the cache, a folder that is no pipeline,
        # no memory to hold it: diffusers raises many kinds; each means the same here.
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise PermanentProviderError(
            f"The model '{spec.name}' is not available: loading {source} failed: {reason}",
            code=ErrorCode.model_unavailable,
        ) from exc
    if spec.scheduler:
        scheduler = getattr(diffusers, spec.scheduler, None)
        if scheduler is None:
            raise PermanentProviderError(
                f"The model '{spec.name}' names a scheduler diffusers does not have: "
                f"{spec.scheduler}.",
                code=ErrorCode.provider_misconfigured,
            )
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    if spec.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe
