"""Submit a generation and (optionally) wait for it: the flow both surfaces share.

reserve budgets and limits -> record job (+ trace call) and commit -> publish -> wait.

The one route flow with a transaction of its own instead of the request's: the
job must be committed and published before the request waits for it, and a
request waiting up to a minute must not hold a database connection meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from api.waiter import Change, JobWaiter
from shared.core.db import unit_of_work
from shared.core.storage import Storage
from shared.idempotency.service import Claim, recall, remember
from shared.jobs.models import FINISHED, Job
from shared.jobs.replies import take_reply
from shared.jobs.schemas import ImagesResponse, job_params
from shared.jobs.service import create_job, get_job, job_images, queue_position
from shared.jobs.submission import Submission
from shared.jobs.views import StoredImage, render_result
from shared.projects.budgets import estimate, get_budgets
from shared.projects.limits import get_limiter
from shared.projects.service import Principal
from shared.webhooks.service import Webhook, webhook_of


@dataclass
class Outcome:
    job: Job
    images: Sequence[StoredImage] = field(default_factory=list)
    # The images' base64, when the worker's reply carried it (no storage read).
    b64: list[str] | None = None

    @property
    def finished(self) -> bool:
        return self.job.status in FINISHED

    async def result(
        self, storage: Storage, base_url: str, url_expiry: int, retention_seconds: int | None
    ) -> ImagesResponse:
        """The succeeded job's answer, its URLs capped at the project's image
        retention. Presigning is local computation, so only reading images back
        from storage needs a thread."""
        render = partial(
            render_result,
            self.job,
            self.images,
            storage,
            base_url,
            url_expiry,
            self.b64,
            retention_seconds=retention_seconds,
        )
        if self.b64 is not None or job_params(self.job).response_format == "url":
            return render()
        return await run_in_threadpool(render)


def _record(submission: Submission, reply: bool) -> Job:
    """The job reserved against the budgets (its estimated cost) and the project's
    limits, recorded and committed (and published after the commit). ``reply``: a
    request waits for it. A refusal comes before any upstream call."""
    submission = submission.for_user()
    principal = submission.principal
    limiter, budgets = get_limiter(), get_budgets()
    cost = estimate(submission.spec, submission.params)
    budgets.reserve_job(principal, submission.job_id, cost, unit_of_work)
    try:
        limiter.reserve_job(principal, submission.job_id, submission.params.n)
    except BaseException:
        budgets.release([submission.job_id])
        raise
    try:
        with unit_of_work() as session:
            if submission.idempotency is not None:
                remember(
                    session, principal.project_id, submission.idempotency, "job", submission.job_id
                )
            job = create_job(session, submission, reply=reply)
    except BaseException:
        limiter.release_job(principal.project_id, submission.job_id)
        budgets.release([submission.job_id])
        raise
    return job


def check_budget(submission: Submission) -> None:
    """A stream's answer starts before its job is recorded: what its budgets already
    cannot cover is refused here, as a 429 (the reservation in ``_record`` decides
    the race, answered as the stream's error event)."""
    cost = estimate(submission.spec, submission.params)
    get_budgets().check(submission.principal, cost)


async def webhook_for(body: Any) -> Webhook | None:
    """The request's own webhook, checked; resolving its target's DNS runs off the
    loop, and only when there is a target."""
    if body.webhook_url is None:
        return webhook_of(body)  # no I/O: only refuses webhook_events alone
    return await run_in_threadpool(webhook_of, body)


def _recall(principal: Principal, claim: Claim) -> str | None:
    with unit_of_work() as session:
        return recall(session, principal.project_id, claim, "job")


def load(principal: Principal, job_id: str) -> Outcome:
    with unit_of_work() as session:
        job = get_job(session, principal.project_id, job_id)
        images = job_images(session, job) if job.status in FINISHED else []
    return Outcome(job, images)


async def submit(request: Request, submission: Submission, wait: float) -> Outcome:
    """Record and enqueue the job; wait up to ``wait`` seconds for it to finish.
    With an idempotency claim already used for this request, the job it made."""
    principal, claim = submission.principal, submission.idempotency
    if claim is not None:
        earlier = await run_in_threadpool(_recall, principal, claim)
        if earlier is not None:
            return await _replay(request, principal, earlier, wait)
    try:
        return await _submit(request, submission, wait)
    except IntegrityError:
        # A twin under the same key committed first: answer with its job.
        twin = await run_in_threadpool(_recall, principal, claim) if claim else None
        if twin is None:
            raise
        return await _replay(request, principal, twin, wait)


PartialFeed = Callable[[str], AbstractAsyncContextManager["asyncio.Queue[dict[str, Any]]"]]


async def stream_job(
    request: Request, submission: Submission, wait: float, feed: PartialFeed
) -> AsyncIterator[tuple[dict[str, Any] | None, Outcome | None]]:
    """Record and enqueue a streamed job, then yield ``(partial, None)`` for each
    partial image as it comes and ``(None, outcome)`` once, at the end (finished,
    or the wait ran out)."""
    job_id, principal = submission.job_id, submission.principal
    waiter: JobWaiter = request.app.state.waiter
    # Both subscriptions before the job is published: nothing can be missed.
    async with feed(job_id) as partials, waiter.subscribe(job_id) as change:
        job = await run_in_threadpool(_record, submission, True)
        waiting = asyncio.ensure_future(_wait(waiter, change, principal, job, wait))
        try:
            while not waiting.done():
                getter = asyncio.ensure_future(partials.get())
                await asyncio.wait({getter, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result(), None
                else:
                    getter.cancel()
            while not partials.empty():  # published before the end, heard after it
                yield partials.get_nowait(), None
            yield None, waiting.result()
        finally:
            waiting.cancel()


async def _replay(request: Request, principal: Principal, job_id: str, wait: float) -> Outcome:
    """The job an earlier request made, waited for as that request would have."""
    if wait <= 0:
        return await run_in_threadpool(load, principal, job_id)
    waiter: JobWaiter = request.app.state.waiter
    async with waiter.subscribe(job_id) as change:
        outcome = await run_in_threadpool(load, principal, job_id)
        if outcome.finished:
            return outcome
        return await _wait(waiter, change, principal, outcome.job, wait)


async def _submit(request: Request, submission: Submission, wait: float) -> Outcome:
    if wait <= 0:
        return Outcome(await run_in_threadpool(_record, submission, False))
    waiter: JobWaiter = request.app.state.waiter
    # Subscribed before the job is published, so no change can be missed, and
    # nothing needs reading until a message (or the fallback timer) says so.
    async with waiter.subscribe(submission.job_id) as change:
        job = await run_in_threadpool(_record, submission, True)
        return await _wait(waiter, change, submission.principal, job, wait)


async def _wait(
    waiter: JobWaiter, change: Change, principal: Principal, job: Job, wait: float
) -> Outcome:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    latest = Outcome(job)
    while True:
        await waiter.changed(change, max(0.0, deadline - loop.time()))
        status = change.take()
        if status is None or status in FINISHED:
            # Finished as announced: the worker left its reply. Otherwise (or with no
            # reply) the rows are the truth.
            reply = await take_reply(job.id) if status is not None else None
            if reply is not None:
                b64 = reply.apply(job)
                return Outcome(job, reply.images, b64)
            latest = await run_in_threadpool(load, principal, job.id)
            if latest.finished:
                return latest
        if loop.time() >= deadline:
            return latest


def position(job: Job) -> int | None:
    """Where a job just accepted stands in its queue (read after the wait)."""
    with unit_of_work() as session:
        return queue_position(session, job)
