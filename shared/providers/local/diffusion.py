"""``diffusers``: a local diffusion pipeline as a provider.

A job's ``n`` images come from one pipeline call (``num_images_per_prompt``), image
``i`` from its own generator seeded ``seed + i``: the same request and seed give
identical images on the same device and dtype. Made apart (the split after an
out-of-memory error, or n=1 with seed + i) an image starts from the same noise and
matches up to the rounding of batched kernels, not bit for bit. The generators
live on the CPU, so the starting noise is the same on every device.

Each denoising step reports through ``progress``, which raises ``JobCanceled``
when the job was canceled or its lease lost: the exception leaves the loop from
inside ``callback_on_step_end``, so a cancel stops the work within one step.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from PIL import Image, ImageOps

from shared.core.errors import ErrorCode, PermanentProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    entry_of,
)
from shared.providers.local.pipelines import Task, device_lock, pipeline
from shared.registry import DiffusersModel, parse_size

log = logging.getLogger(__name__)


class DiffusersProvider:
    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, DiffusersModel)
        params, count, first_index = call.params, call.count, call.first_index
        progress, partials, inputs = call.progress, call.partials, call.inputs
        width, height = parse_size(params.size) or (512, 512)
        task, extra = _task(params, inputs, (width, height))
        pipe, device = pipeline(spec, task)
        first_seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        seeds = [first_seed + first_index + i for i in range(count)]
        steps = spec.steps_for(params.quality)
        if "strength" in extra:  # image-to-image runs the last `strength` of the steps
            steps = max(1, int(spec.steps_for(params.quality) * extra["strength"]))
            extra["num_inference_steps"] = spec.steps_for(params.quality)
        else:
            extra["num_inference_steps"] = steps

        checkpoints = _checkpoints(steps, params.partial_images)

        def run(chunk: list[int], done: int, total: int) -> list[Any]:
            first = first_index + seeds.index(chunk[0])

            def on_step(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                progress(done + step + 1, total)
                if step + 1 in checkpoints:
                    for i, image in enumerate(_preview(pipe, tensors["latents"])):
                        partials(first + i, checkpoints.index(step + 1), _png(image))
                return tensors

            with device_lock(device):
                out = pipe(
                    prompt=params.prompt,
                    **extra,
                    guidance_scale=spec.guidance_scale,
                    num_images_per_prompt=len(chunk),
                    generator=[torch.Generator("cpu").manual_seed(s) for s in chunk],
                    callback_on_step_end=on_step,
                    output_type="pil",
                )
            return list(out.images)

        images = _split_on_oom(spec, params.size, seeds, steps, run)
        return Generation(images=[GeneratedImage(data=_png(image)) for image in images])


# How much of the input an edit repaints (diffusers' `strength`): input_fidelity
# "high" keeps more of it.
STRENGTH = {"high": 0.5, "low": 0.8}


def _task(
    params: GenerationParams, inputs: Inputs | None, size: tuple[int, int]
) -> tuple[Task, dict[str, Any]]:
    """Which pipeline a job needs, and its arguments beside the prompt: text-to-image;
    an edit is image-to-image from its (first) input, or inpainting where its mask is
    transparent (diffusers repaints white)."""
    if params.operation == "generate":
        return "text2image", {"width": size[0], "height": size[1]}
    if params.operation != "edit" or inputs is None or not inputs.images:
        raise PermanentProviderError(
            f"Local models make generations and edits, not {params.operation}s.",
            code=ErrorCode.invalid_value,
        )
    image = Image.open(io.BytesIO(inputs.images[0])).convert("RGB").resize(size)
    extra: dict[str, Any] = {"image": image, "strength": STRENGTH[params.input_fidelity or "low"]}
    if inputs.mask is None:
        return "image2image", extra
    alpha = Image.open(io.BytesIO(inputs.mask)).convert("RGBA").getchannel("A")
    extra["mask_image"] = ImageOps.invert(alpha.resize(size))
    extra.update(width=size[0], height=size[1])
    return "inpainting", extra


def _checkpoints(steps: int, partial_images: int) -> list[int]:
    """The steps after which a streamed request's partial images are decoded:
    evenly spaced, none at the last step (the final image follows it)."""
    return [round(steps * (k + 1) / (partial_images + 1)) for k in range(partial_images)]


def _preview(pipe: Any, latents: Any) -> list[Any]:
    """The pictures the latents hold so far, decoded by the model's VAE."""
    with torch.no_grad():
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
    return list(pipe.image_processor.postprocess(decoded[0], output_type="pil"))


def _split_on_oom(
    spec: DiffusersModel,
    size: str,
    seeds: list[int],
    steps: int,
    run: Callable[[list[int], int, int], list[Any]],
) -> list[Any]:
    """All images in one call; out of GPU memory, once more one image a call; out of
    memory again, the job fails naming the model and size."""
    try:
        return _refusing_bad_input(spec, partial(run, seeds, 0, steps))
    except torch.cuda.OutOfMemoryError:
        _free_cache()
        if len(seeds) > 1:
            log.warning(
                "model %s: out of GPU memory for %d images; one a call", spec.name, len(seeds)
            )
            try:
                return [
                    image
                    for i, seed in enumerate(seeds)
                    for image in _refusing_bad_input(
                        spec, partial(run, [seed], i * steps, len(seeds) * steps)
                    )
                ]
            except torch.cuda.OutOfMemoryError:
                _free_cache()
        raise PermanentProviderError(
            f"The model '{spec.name}' ran out of GPU memory making a {size} image. "
            "Try a smaller size or n, or set cpu_offload or vae_tiling on the model.",
            code=ErrorCode.out_of_memory,
        ) from None


def _refusing_bad_input(spec: DiffusersModel, call: Callable[[], list[Any]]) -> list[Any]:
    try:
        return call()
    except ValueError as exc:  # the pipeline's own checks (a size it cannot make)
        raise PermanentProviderError(
            f"The model '{spec.name}' refused the request: {exc}", code=ErrorCode.invalid_value
        ) from exc


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast; re-encoded on request
    return buf.getvalue()
