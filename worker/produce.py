"""Producing a job's images: provider calls with retries, fan-out when a model makes
fewer images per call than asked, then encoding and storing each image (waiting
out a storage outage). Nothing here writes to the database."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from shared.core import retry
from shared.core.errors import (
    JobCanceled,
    NoCapacity,
    PermanentProviderError,
    ProviderError,
    StorageUnavailable,
    TransientProviderError,
    UnreadableImage,
    UpstreamPending,
)
from shared.core.instruments import (
    CAPACITY_WAITS,
    DEPLOYMENT_CALLS,
    DEPLOYMENT_COOLDOWNS,
    DEPLOYMENT_SECONDS,
    PROVIDER_ERRORS,
    PROVIDER_SECONDS,
    STORAGE_WRITES,
)
from shared.core.logs import bind
from shared.core.settings import get_settings
from shared.core.storage import Storage, get_storage, image_key
from shared.imaging import encode
from shared.jobs import routing
from shared.jobs.capacity import Taken
from shared.jobs.models import Image, Job
from shared.jobs.partials import PartialPublisher
from shared.jobs.schemas import GenerationParams, job_params
from shared.providers import get_provider
from shared.providers.answers import answer_slot, before_answer
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    Partials,
    Progress,
    no_partials,
)
from shared.registry import ModelSpec, get_registry
from worker import upstream_jobs
from worker.leases import LEASES
from worker.progress import StepReporter, set_detail
from worker.record import Result
from worker.resources import answer_slots, capacity, cooldowns, fanout_pool

log = logging.getLogger(__name__)


# A wait for room shorter than this is slept here (the thread idle, the job
# running); a longer one goes back to the queue (shared/jobs/lifecycle.py:defer),
# holding nothing while it waits.
WAIT_IN_PLACE_SECONDS = 2.0
# Come back just after the turn, not just before it (a timer firing early would
# find no room and queue again at the end of the line).
_LATE = 0.005


@dataclass(frozen=True)
class _Busy:
    """No target had room: how long until one may, and why."""

    wait: float
    why: str
    slots: bool  # for a concurrency slot: when one frees is not known


def _call_with_retries(
    spec: ModelSpec,
    params: GenerationParams,
    count: int,
    first: int,
    job_id: str,
    progress: Progress,
    partials: Partials,
    inputs: Inputs | None,
    interactive: bool = True,
    may_defer: bool = False,
) -> Generation:
    """One call, each attempt trying the model's deployments and then its fallbacks
    (shared/jobs/routing.py), the attempts spaced by the provider retry policy.
    Where every deployment that could take it is at its limit, it waits for room
    (shared/jobs/capacity.py) without spending an attempt: in place when the wait is
    short, else (``may_defer``) raising NoCapacity to wait in the queue."""
    policy = retry.provider_calls(get_settings())
    attempt = 0
    first_try = time.monotonic()
    call = Call(spec, params, count, first, progress, partials, inputs)
    submitted = upstream_jobs.resumed(call, job_id)
    if submitted is not None:  # a queue provider's job recorded by an earlier attempt
        try:
            return _call(call, submitted, job_id)
        except TransientProviderError as exc:  # it failed there: submitted anew below
            log.info("job %s: its upstream job failed: %s", job_id, exc.message)
    waited = 0.0  # in place, for slots in a row
    while True:
        tried = _try_targets(call, job_id, interactive)
        if isinstance(tried, Generation):
            return tried
        if isinstance(tried, _Busy):
            # A wait for the rate is its turn (a ticket): in place when it is near.
            # A wait for a slot is short but repeats for as long as the deployment
            # is full: past 2 s of them the job goes back, for 2 s at least.
            waited = waited + tried.wait if tried.slots else 0.0
            if may_defer and max(tried.wait, waited) > WAIT_IN_PLACE_SECONDS:
                CAPACITY_WAITS.labels(spec.name, "queue").inc()
                back = max(tried.wait, WAIT_IN_PLACE_SECONDS) if tried.slots else tried.wait
                raise NoCapacity(tried.why, retry_after=back)
            CAPACITY_WAITS.labels(spec.name, "in_place").inc()
            _wait_unless_lost(job_id, tried.wait)
            continue
        attempt += 1
        if policy.exhausted(attempt, first_try):
            raise tried
        delay = policy.delay(attempt, tried.retry_after)
        log.info("job %s: retry %d in %.1fs", job_id, attempt, delay)
        _wait_unless_lost(job_id, delay)


def _try_targets(
    call: Call, job_id: str, interactive: bool
) -> Generation | _Busy | TransientProviderError:
    """One attempt over the targets in order: the first that has room and answers
    serves it. A target at its limit is passed over, not failed; where one was, the
    next model's targets (fallbacks) are not tried: they serve failures, not a
    model that is only busy."""
    failed: TransientProviderError | None = None
    busy: list[tuple[Taken, routing.Target]] = []
    for target in routing.targets(call.spec, call.params, get_registry(), cooldowns()):
        if busy and target.model != busy[0][1].model:
            break
        if target.probe and not cooldowns().claim(target):
            continue  # half open, and another call is probing it
        taken = capacity().take(target, call.count, interactive)
        if taken.call_id is None:
            if target.probe:
                cooldowns().unclaim(target)
            busy.append((taken, target))
            continue
        try:
            return _call(call, target, job_id)
        except TransientProviderError as exc:
            failed = exc
            log.info("job %s: %s from %s", job_id, exc.message, target.served_by)
        finally:
            capacity().give_back(target, taken)
    if busy:
        refused, target = min(busy, key=lambda pair: pair[0].wait)
        if not interactive:  # a batch line queues for its turn there
            refused = capacity().book(target, call.count)
        why = f"waiting for capacity: every deployment of '{target.model}' is at its limit"
        return _Busy(refused.wait + _LATE, why, refused.slots)
    if failed is None:  # every deployment cooling down
        failed = TransientProviderError(
            f"every deployment of '{call.spec.name}' is cooling down",
            code="upstream_rate_limited",
            retry_after=cooldowns().shortest(),
        )
    return failed


def _call(call: Call, target: routing.Target, job_id: str) -> Generation:
    """One call to one target, counted. A transient failure cools the target down;
    any answer from a probed one (even a refusal) makes it healthy again. A queue
    provider's call is submitted once and looked at (worker/upstream_jobs.py)."""
    started = time.monotonic()
    call = replace(call, spec=target.spec, params=target.params)
    try:
        if upstream_jobs.queued(target):
            generation = upstream_jobs.call(call, target, job_id)
        else:
            generation = get_provider(target.spec).generate(call)
    except UpstreamPending:
        if target.probe:  # it took the submit: healthy
            cooldowns().healthy(target)
        raise
    except ProviderError as exc:
        PROVIDER_ERRORS.labels(target.model, str(exc.code)).inc()
        DEPLOYMENT_CALLS.labels(target.model, target.deployment, str(exc.code)).inc()
        if isinstance(exc, TransientProviderError):
            if target.cools:
                DEPLOYMENT_COOLDOWNS.labels(target.model, target.deployment).inc()
            cooldowns().cool(target, exc.retry_after)
        elif target.probe:
            cooldowns().healthy(target)
        raise  # transient: the caller moves on; a refusal: nothing else would take it
    seconds = time.monotonic() - started
    PROVIDER_SECONDS.labels(target.model).observe(seconds)
    DEPLOYMENT_SECONDS.labels(target.model, target.deployment).observe(seconds)
    DEPLOYMENT_CALLS.labels(target.model, target.deployment, "ok").inc()
    if target.probe:
        cooldowns().healthy(target)
    generation.served_by = target.served_by
    return generation


def _generate(
    spec: ModelSpec,
    params: GenerationParams,
    job_id: str,
    progress: Progress,
    partials: Partials = no_partials,
    inputs: Inputs | None = None,
    interactive: bool = True,
) -> Generation:
    """All ``n`` images, fanning out when the upstream makes fewer per call. Only a
    single call may wait for room in the queue: a fan-out's calls wait in place,
    so none of its images already made is thrown away."""
    per_call = max(1, spec.images_per_call)
    chunks = [(first, min(per_call, params.n - first)) for first in range(0, params.n, per_call)]
    if len(chunks) == 1:
        return _call_with_retries(
            spec, params, params.n, 0, job_id, progress, partials, inputs, interactive, True
        )
    futures = [
        fanout_pool().submit(
            # In a copy of this context: the calls share the job's answer slot.
            contextvars.copy_context().run,
            _call_with_retries,
            spec,
            params,
            count,
            first,
            job_id,
            progress,
            partials,
            inputs,
            interactive,
        )
        for first, count in chunks
    ]
    images: list[GeneratedImage] = []
    usage: dict[str, Any] = {}
    served_by: dict[str, str] | None = None
    errors: list[BaseException] = []
    for future in futures:  # wait for all, so no call outlives the attempt
        try:
            gen = future.result()
        except BaseException as exc:
            errors.append(exc)
            continue
        images += gen.images
        _add_usage(usage, gen.usage or {})
        served_by = served_by or gen.served_by
    if errors:
        permanent = [e for e in errors if isinstance(e, PermanentProviderError)]
        raise (permanent or errors)[0]
    return Generation(images=images, usage=usage or None, served_by=served_by)


def partial_sink(job: Job, params: GenerationParams) -> PartialPublisher | None:
    """Where a streamed job's partial images go, if it asked for them."""
    return PartialPublisher(job.id) if params.stream and params.partial_images else None


def job_inputs(params: GenerationParams) -> Inputs | None:
    """An edit's or a variation's uploads, read back from storage (stored under the
    job when it was accepted) when a provider first needs them."""
    if params.operation == "generate":
        return None

    def load() -> tuple[list[bytes], bytes | None]:
        storage = get_storage()
        mask = storage.get(params.mask) if params.mask else None
        return [storage.get(key) for key in params.images], mask

    return Inputs(load=load)


def _add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Sum one call's usage into the job's: counts, and the counts inside
    ``input_tokens_details``/``output_tokens_details`` (kept, not flattened)."""
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            inner = total.setdefault(key, {})
            if isinstance(inner, dict):
                _add_usage(inner, value)


# A job's images made elsewhere (a GPU call shared with other jobs, worker/gpu/):
# its generation and last progress, or the exception its part of the call raised.
Made = Callable[[], tuple[Generation, dict[str, int] | None]]


def produce(job: Job, made: Made | None = None) -> Result | None:
    """Generate and store the job's images; None when the attempt was canceled.
    Every line logged meanwhile names the job, its batch, project and request. From
    its provider's answer until its images are stored, the job holds one of the
    process's answer slots (shared/providers/answers.py): a burst of answers costs
    memory by the slots, not by the calls in flight. ``made``: the images were
    made by a call this job shared (worker/gpu/), handed over here to be stored."""
    with (
        bind(
            job_id=job.id, batch_id=job.batch_id, project=job.project_id, request_id=job.request_id
        ),
        answer_slot(answer_slots()),
    ):
        upstream_jobs.UPSTREAMS.hold(job)
        try:
            return _produce(job, made)
        finally:
            upstream_jobs.UPSTREAMS.release(job.id)


def _produce(job: Job, made: Made | None) -> Result | None:
    params = job_params(job)
    try:
        spec = get_registry().get(job.model)
        if made is None:
            steps = StepReporter(job)
            sink = partial_sink(job, params)
            inputs = job_inputs(params)
            interactive = job.batch_id is None  # ahead of batch lines for the same room
            generation = _generate(
                spec, params, job.id, steps, sink or no_partials, inputs, interactive
            )
            final = steps.final
        else:
            generation, final = made()
        if LEASES.lost(job.id):
            raise JobCanceled()
        before_answer()  # taken already, unless the provider made its images here
        storage = get_storage()
        images, data = [], []
        for index, generated in enumerate(generation.images):
            encoded = encode(generated.data, params.output_format, params.output_compression)
            key = image_key(job.project_id, job.id, index, encoded.fmt)
            _store(storage, key, encoded.data, encoded.content_type, job)
            data.append(encoded.data)
            images.append(
                Image(
                    project_id=job.project_id,
                    job_id=job.id,
                    index=index,
                    storage_key=key,
                    content_type=encoded.content_type,
                    width=encoded.width,
                    height=encoded.height,
                    size_bytes=len(encoded.data),
                    revised_prompt=generated.revised_prompt,
                )
            )
        return Result(
            job,
            True,
            images,
            data if job.batch_id is None else [],  # batch lines have no waiter
            usage=generation.usage,
            progress=final or None,
            served_by=generation.served_by,
            cost_usd=_cost(spec, params, len(images), generation),
        )
    except JobCanceled:
        log.info("job %s stopped: canceled, or its lease was lost", job.id)
        return None
    except (NoCapacity, UpstreamPending) as exc:
        wait = exc.retry_after or WAIT_IN_PLACE_SECONDS
        log.info("job %s: %s; back in %.1fs", job.id, exc.message, wait)
        return Result.deferred(job, wait, f"{exc.message} (back in {wait:.0f} s)")
    except (ProviderError, UnreadableImage) as exc:
        upstream_jobs.cancel_open(job.id)  # a fan-out's other calls: stop paying there
        code = exc.code if isinstance(exc, ProviderError) else "upstream_bad_response"
        message = exc.message if isinstance(exc, ProviderError) else str(exc)
        log.info("job %s failed: %s: %s", job.id, code, message)
        return Result.failure(job, code, message)
    except Exception as exc:
        # Our own fault (storage down, a bug): fail the job visibly, never as an
        # empty success. The message names the kind of fault, not internals.
        log.exception("job %s crashed", job.id)
        return Result.failure(job, "internal_error", f"internal error: {type(exc).__name__}")


def _cost(
    spec: ModelSpec, params: GenerationParams, images: int, generation: Generation
) -> float | None:
    """The images' cost by the price of the model that made them (a fallback's
    own); None where it has no price."""
    served = generation.served_by
    priced = get_registry().get(served["model"]) if served else spec
    if priced.price is None:
        return None
    return priced.price.cost(params.size, params.quality, images, generation.usage)


def _store(storage: Storage, key: str, data: bytes, content_type: str, job: Job) -> None:
    """Upload, waiting out a storage outage: the job keeps its generated images
    (its lease renewed meanwhile) instead of failing or paying the provider again,
    and says what it waits on (``status_detail``) until storage is back."""
    policy = retry.storage_writes(get_settings())
    attempt = 0
    waiting = False
    while True:
        attempt += 1
        try:
            storage.put(key, data, content_type)
            STORAGE_WRITES.labels("ok").inc()
            if waiting:
                set_detail(job, None)
            return
        except StorageUnavailable as exc:
            STORAGE_WRITES.labels("unavailable").inc()
            delay = policy.delay(attempt)
            log.warning("job %s: %s; trying again in %.1fs", job.id, exc, delay)
            if not waiting:
                waiting = set_detail(job, f"waiting for storage: {exc.message}"[:500])
        _wait_unless_lost(job.id, delay)


def _wait_unless_lost(job_id: str, seconds: float) -> None:
    """Sleep before a retry; raises JobCanceled as soon as the job's lease is lost."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if LEASES.lost(job_id):
            raise JobCanceled()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
