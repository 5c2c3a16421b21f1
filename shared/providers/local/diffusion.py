"""``diffusers``: a local diffusion pipeline as a provider, and the pipeline call
that jobs share (issue 30).

A call makes the images of one or more jobs whose ``Plan`` is equal (model, task,
size, steps, edit strength, LoRA adapters): each job a ``Member`` with its own
prompt, seeds, progress, partial images and inputs. Image ``i`` of a job comes from
its own generator seeded ``seed + i``, on the CPU, so its starting noise is the same
on every device and in every call it shares. The pictures then match made alone or
batched up to the rounding of batched kernels, not bit for bit: a matrix product's
row depends on how many rows the product has (measured on this CPU build: the first
difference is in the UNet's time embedding, 6e-8, and the decoded image differs by
at most one level in a few pixels). The same call with the same companions gives
the same bytes.

Each denoising step reports to every member's ``progress``, which raises
``JobCanceled`` when that job was canceled or its lease lost: the member is dropped
(its images discarded at the end) and the call goes on for the others; with every
member dropped the call stops at that step. Out of GPU memory, the call is split in
halves and each retried, down to one image; one image that does not fit fails its
job (``out_of_memory``) and only it.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageOps

from shared.core.errors import ErrorCode, JobCanceled, PermanentProviderError
from shared.core.instruments import GPU_CALL_IMAGES, GPU_CALL_SECONDS
from shared.jobs.schemas import GenerationParams
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    Partials,
    Progress,
    entry_of,
    no_partials,
    no_progress,
)
from shared.providers.local import adapters, pipelines
from shared.providers.local.pipelines import Task, device_lock
from shared.registry import DiffusersModel, parse_size

log = logging.getLogger(__name__)

# How much of the input an edit repaints (diffusers' `strength`): input_fidelity
# "high" keeps more of it.
STRENGTH = {"high": 0.5, "low": 0.8}


@dataclass(frozen=True)
class Plan:
    """What the jobs of one call share: equal plans (of one model) may share a call."""

    task: Task
    width: int
    height: int
    steps: int  # num_inference_steps, as the pipeline is given it
    runs: int  # the steps that run (image-to-image runs the last `strength` of them)
    strength: float | None
    lora: tuple[tuple[str, float], ...]


def plan_of(spec: DiffusersModel, params: GenerationParams) -> Plan:
    """The call a job needs: text-to-image; an edit is image-to-image from its (first)
    input, or inpainting where it has a mask (transparent = repaint)."""
    width, height = parse_size(params.size) or (512, 512)
    steps = spec.steps_for(params.quality)
    lora = tuple((choice.name, choice.scale) for choice in params.lora)
    if params.operation == "generate":
        return Plan("text2image", width, height, steps, steps, None, lora)
    if params.operation != "edit" or not params.images:
        raise PermanentProviderError(
            f"Local models make generations and edits, not {params.operation}s.",
            code=ErrorCode.invalid_value,
        )
    strength = STRENGTH[params.input_fidelity or "low"]
    task: Task = "inpainting" if params.mask else "image2image"
    return Plan(task, width, height, steps, max(1, int(steps * strength)), strength, lora)


@dataclass(eq=False)
class Member:
    """One job's images in a call (``first_index``: the job's index of the first)."""

    job: str
    prompt: str
    seeds: list[int]
    first_index: int = 0
    progress: Progress = no_progress
    partials: Partials = no_partials
    partial_images: int = 0
    inputs: Inputs | None = None
    canceled: bool = False
    failed: BaseException | None = None
    images: dict[int, bytes] = field(default_factory=dict)  # by position in seeds
    parts: int = 0  # the calls its images take (for its progress)
    _inputs: tuple[Any, Any] | None = None

    def picture_inputs(self, plan: Plan) -> tuple[Any, Any]:
        """An edit's input image and the mask diffusers wants (white = repaint),
        decoded once and sized to the plan."""
        if self._inputs is None:
            if self.inputs is None or not self.inputs.images:
                raise PermanentProviderError(
                    "An edit needs an input image.", code=ErrorCode.invalid_value
                )
            size = (plan.width, plan.height)
            image = Image.open(io.BytesIO(self.inputs.images[0])).convert("RGB").resize(size)
            mask = None
            if plan.task == "inpainting" and self.inputs.mask is not None:
                alpha = Image.open(io.BytesIO(self.inputs.mask)).convert("RGBA").getchannel("A")
                mask = ImageOps.invert(alpha.resize(size))
            self._inputs = (image, mask)
        return self._inputs

    def outcome(self) -> list[bytes] | BaseException:
        """Its images in order, or why it has none."""
        if self.failed is not None:
            return self.failed
        if self.canceled:
            return JobCanceled()
        return [self.images[i] for i in range(len(self.seeds))]


@dataclass(frozen=True)
class _Part:
    """Images ``lo`` .. ``hi - 1`` of a member, in one call; ``index``: which of the
    member's calls (its progress counts on from the ones before)."""

    member: Member
    lo: int
    hi: int
    index: int

    @property
    def count(self) -> int:
        return self.hi - self.lo


class _AllDropped(Exception):
    """Every member of a call was canceled: the loop stops at this step."""


def make(
    spec: DiffusersModel, plan: Plan, members: Sequence[Member]
) -> dict[str, list[bytes] | BaseException]:
    """Every member's images, from as few calls as ``max_batch_images`` allows: each
    job's images or the exception that ended them (JobCanceled when it was canceled)."""
    if plan.task != "text2image":  # an edit's unreadable input fails its job alone
        for member in members:
            try:
                member.picture_inputs(plan)
            except Exception as exc:
                member.failed = exc
    live = [member for member in members if member.failed is None]
    try:
        with pipelines.using(spec, plan.task) as (pipe, device):  # never unloaded meanwhile
            for call in _pack(live, spec.max_batch_images):
                _attempt(pipe, device, spec, plan, call)
    except PermanentProviderError as exc:  # it could not be loaded
        return {member.job: exc for member in members}
    return {member.job: member.outcome() for member in members}


def _pack(members: Sequence[Member], room: int) -> list[list[_Part]]:
    """The members' images in calls of at most ``room`` images, in order; a job
    whose images do not fit one call takes several."""
    calls: list[list[_Part]] = [[]]
    left = room
    for member in members:
        lo, index = 0, 0
        while lo < len(member.seeds):
            if left == 0:
                calls.append([])
                left = room
            hi = min(len(member.seeds), lo + left)
            calls[-1].append(_Part(member, lo, hi, index))
            left -= hi - lo
            lo, index = hi, index + 1
        member.parts = index
    return [call for call in calls if call]


def _halves(parts: list[_Part]) -> tuple[list[_Part], list[_Part]]:
    """A call's images split in two (a member's images may fall on both sides)."""
    half = sum(part.count for part in parts) // 2
    first: list[_Part] = []
    second: list[_Part] = []
    taken = 0
    for part in parts:
        take = max(0, min(part.count, half - taken))
        if take:
            first.append(_Part(part.member, part.lo, part.lo + take, part.index))
        if take < part.count:
            second.append(_Part(part.member, part.lo + take, part.hi, part.index))
        taken += take
    return first, second


def _attempt(
    pipe: Any, device: torch.device, spec: DiffusersModel, plan: Plan, parts: list[_Part]
) -> None:
    """One call for ``parts``; out of memory, each half on its own."""
    live = [p for p in parts if not p.member.canceled and p.member.failed is None]
    if not live:
        return
    try:
        _call(pipe, device, spec, plan, live)
    except torch.cuda.OutOfMemoryError:
        _free_cache()
        if sum(part.count for part in live) > 1:
            first, second = _halves(live)
            log.warning(
                "model %s: out of GPU memory for %d images (jobs %s); %d and %d a call",
                spec.name,
                sum(p.count for p in live),
                _jobs(live),
                sum(p.count for p in first),
                sum(p.count for p in second),
            )
            _attempt(pipe, device, spec, plan, first)
            _attempt(pipe, device, spec, plan, second)
            return
        live[0].member.failed = PermanentProviderError(
            f"The model '{spec.name}' ran out of GPU memory making a "
            f"{plan.width}x{plan.height} image. Try a smaller size or n, or set "
            "cpu_offload or vae_tiling on the model.",
            code=ErrorCode.out_of_memory,
        )
    except _AllDropped:
        return
    except ValueError as exc:  # the pipeline's own checks (a size it cannot make)
        for part in live:
            part.member.failed = PermanentProviderError(
                f"The model '{spec.name}' refused the request: {exc}",
                code=ErrorCode.invalid_value,
            )
    except (PermanentProviderError, JobCanceled) as exc:  # an edit's unreadable input
        for part in live:
            part.member.failed = exc
    except Exception as exc:  # the pipeline failed (a bug, a driver error): each job's
        log.exception("model %s: a call failed for jobs %s", spec.name, _jobs(live))
        for part in live:
            part.member.failed = exc


def _jobs(parts: list[_Part]) -> str:
    """The jobs of a call, for its log lines (they run outside any one job's log
    context: a call is several jobs')."""
    return ", ".join(dict.fromkeys(part.member.job for part in parts))


def _call(
    pipe: Any, device: torch.device, spec: DiffusersModel, plan: Plan, parts: list[_Part]
) -> None:
    prompts: list[str] = []
    generators: list[torch.Generator] = []
    images: list[Any] = []
    masks: list[Any] = []
    rows: list[int] = []  # each part's first row in the call's latents
    for part in parts:
        rows.append(len(prompts))
        member = part.member
        image, mask = member.picture_inputs(plan) if plan.task != "text2image" else (None, None)
        for i in range(part.lo, part.hi):
            prompts.append(member.prompt)
            generators.append(torch.Generator("cpu").manual_seed(member.seeds[i]))
            images.append(image)
            masks.append(mask)
    extra: dict[str, Any] = {"num_inference_steps": plan.steps}
    if plan.task != "image2image":
        extra.update(width=plan.width, height=plan.height)
    if plan.task != "text2image":
        extra.update(image=images, strength=plan.strength)
    if plan.task == "inpainting":
        extra["mask_image"] = masks
    on_step = _stepper(pipe, plan, parts, rows)
    started = time.monotonic()
    with device_lock(device):  # the adapters switched for this call, then the call
        adapters.activate(pipe, spec, plan.lora)
        out = pipe(
            prompt=prompts,
            **extra,
            guidance_scale=spec.guidance_scale,
            num_images_per_prompt=1,
            generator=generators,
            callback_on_step_end=on_step,
            output_type="pil",
        )
    GPU_CALL_SECONDS.labels(spec.name).observe(time.monotonic() - started)
    GPU_CALL_IMAGES.labels(spec.name).observe(len(prompts))
    pictures = list(out.images)
    for part, row in zip(parts, rows, strict=True):
        for i in range(part.count):
            part.member.images[part.lo + i] = _png(pictures[row + i])


def _stepper(pipe: Any, plan: Plan, parts: list[_Part], rows: list[int]) -> Any:
    """The call's step callback: each live member's progress (a cancel drops it),
    and its partial images at its checkpoints, from its rows of the latents."""
    marks = {id(part.member): _checkpoints(plan.runs, part.member.partial_images) for part in parts}

    def on_step(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        alive = 0
        for part, row in zip(parts, rows, strict=True):
            member = part.member
            if member.canceled or member.failed is not None:
                continue
            try:
                member.progress(plan.runs * part.index + step + 1, plan.runs * member.parts)
            except JobCanceled:
                member.canceled = True
                continue
            alive += 1
            if step + 1 in marks[id(member)]:
                latents = tensors["latents"][row : row + part.count]
                for i, picture in enumerate(_preview(pipe, latents)):
                    index = member.first_index + part.lo + i
                    member.partials(index, marks[id(member)].index(step + 1), _png(picture))
        if not alive:
            raise _AllDropped()
        return tensors

    return on_step


class DiffusersProvider:
    """One job's call on its own (the GPU consumer batches jobs: worker/gpu/)."""

    def generate(self, call: Call) -> Generation:
        spec = entry_of(call.spec, DiffusersModel)
        params = call.params
        plan = plan_of(spec, params)
        member = Member(
            job="call",
            prompt=params.prompt,
            seeds=seeds_of(params, call.first_index, call.count),
            first_index=call.first_index,
            progress=call.progress,
            partials=call.partials,
            partial_images=params.partial_images,
            inputs=call.inputs,
        )
        made = make(spec, plan, [member])["call"]
        if isinstance(made, BaseException):
            raise made
        return Generation(images=[GeneratedImage(data=data) for data in made])


def seeds_of(params: GenerationParams, first_index: int, count: int) -> list[int]:
    """Image ``i``'s seed is the job's seed + i (a random one where it has none)."""
    first = params.seed if params.seed is not None else secrets.randbelow(2**32)
    return [first + first_index + i for i in range(count)]


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


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast; re-encoded on request
    return buf.getvalue()
