"""Submit a generation and (optionally) wait for it: the flow both surfaces share.

reserve limits -> record job (+ trace call) and commit -> publish -> wait.

The one route flow with a transaction of its own instead of the request's: the
job must be committed and published before the request waits for it, and a
request waiting up to a minute must not hold a database connection meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from shared.core.db import unit_of_work
from shared.core.ids import new_id
from shared.jobs.models import FINISHED, Image, Job
from shared.jobs.schemas import GenerationParams
from shared.jobs.service import create_job, get_job, job_images, queue_position
from shared.projects.limits import get_limiter
from shared.projects.service import Principal
from shared.registry import ModelSpec
from shared.traces.service import OP_OPENAI
from shared.webhooks.service import Webhook


@dataclass
class Outcome:
    job: Job
    images: list[Image]

    @property
    def finished(self) -> bool:
        return self.job.status in FINISHED


def _record(
    principal: Principal,
    params: GenerationParams,
    spec: ModelSpec,
    *,
    surface: str,
    track: bool,
    op_name: str,
    call_inputs: dict[str, Any] | None,
    webhook: Webhook | None,
) -> Job:
    job_id = new_id("job")
    limiter = get_limiter()
    limiter.reserve_job(principal, job_id, params.n)
    try:
        with unit_of_work() as session:
            job = create_job(
                session,
                principal,
                params,
                spec,
                job_id=job_id,
                surface=surface,
                track=track,
                op_name=op_name,
                call_inputs=call_inputs,
                webhook=webhook,
            )
    except BaseException:
        limiter.release_job(principal.project_id, job_id)
        raise
    return job


def load(principal: Principal, job_id: str) -> Outcome:
    with unit_of_work() as session:
        job = get_job(session, principal.project_id, job_id)
        images = job_images(session, job) if job.status in FINISHED else []
    return Outcome(job, images)


async def submit(
    request: Request,
    principal: Principal,
    params: GenerationParams,
    spec: ModelSpec,
    *,
    wait: float,
    surface: str = "openai",
    track: bool = True,
    op_name: str = OP_OPENAI,
    call_inputs: dict[str, Any] | None = None,
    webhook: Webhook | None = None,
) -> Outcome:
    """Record and enqueue the job; wait up to ``wait`` seconds for it to finish."""
    if params.user is None and principal.user:
        params = params.model_copy(update={"user": principal.user})
    job = await run_in_threadpool(
        _record,
        principal,
        params,
        spec,
        surface=surface,
        track=track,
        op_name=op_name,
        call_inputs=call_inputs,
        webhook=webhook,
    )
    if wait <= 0:
        return Outcome(job, [])
    latest: Outcome = Outcome(job, [])

    async def finished() -> bool:
        nonlocal latest
        latest = await run_in_threadpool(load, principal, job.id)
        return latest.finished

    await request.app.state.waiter.wait(job.id, wait, finished)
    return latest


def position(job: Job) -> int | None:
    """Where a job just accepted stands in its queue (read after the wait)."""
    with unit_of_work() as session:
        return queue_position(session, job)
