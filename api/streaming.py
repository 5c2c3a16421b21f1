"""Streamed generations (``stream: true``): OpenAI's image events as server-sent
events, which the ``openai`` package's ``stream=True`` iterates unmodified.

The job is recorded and run as any other (its images, trace and webhooks too).
Before it is published this process subscribes to its change events and to its
partial-image channel (shared/jobs/partials.py); it relays each partial image as
``image_generation.partial_image``, and when the job ends sends one
``image_generation.completed`` per image (from the worker's reply: no storage
read), or an ``error`` event in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from api.deps import ImageLinks
from api.generation import Outcome, stream_job
from shared.core.errors import ClientError, ImagegenError, UpstreamError
from shared.core.events import async_redis_client
from shared.jobs.models import JobStatus
from shared.jobs.openai_shape import NO_USAGE, event_fields, token_usage
from shared.jobs.partials import channel
from shared.jobs.submission import Submission
from shared.jobs.views import job_failure


@contextlib.asynccontextmanager
async def partial_feed(job_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """The job's partial images as they are published (none without Redis)."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    client = async_redis_client()
    if client is None:
        yield queue
        return
    pubsub = client.pubsub()
    await pubsub.subscribe(channel(job_id))

    async def pump() -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                with contextlib.suppress(ValueError, TypeError):
                    queue.put_nowait(json.loads(message["data"]))

    task = asyncio.create_task(pump())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await pubsub.aclose()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _error(error: ImagegenError) -> bytes:
    body = {
        "type": error.error_type,
        "message": error.message,
        "param": error.param,
        "code": str(error.code) if error.code else None,
    }
    return _event("error", {"type": "error", "error": body})


def stream_response(
    request: Request,
    submission: Submission,
    *,
    wait: float,
    links: ImageLinks,
    prefix: str = "image_generation",
) -> StreamingResponse:
    """``prefix``: ``image_generation`` for generations, ``image_edit`` for edits."""
    shape = event_fields(submission.params)

    async def events() -> AsyncIterator[bytes]:
        outcome: Outcome | None = None
        try:
            async for partial, done in stream_job(request, submission, wait, partial_feed):
                if done is not None:
                    outcome = done
                    continue
                assert partial is not None
                yield _event(
                    f"{prefix}.partial_image",
                    {
                        "type": f"{prefix}.partial_image",
                        "b64_json": partial["b64_json"],
                        "partial_image_index": partial["partial_image_index"],
                        "created_at": int(time.time()),
                        **shape,
                    },
                )
        except ClientError as exc:  # refused as it was recorded (a budget, a limit)
            yield _error(exc)
            return
        assert outcome is not None
        job = outcome.job
        if not outcome.finished:
            yield _error(
                UpstreamError(
                    f"The image is not ready yet; poll GET /v1/images/jobs/{job.id}.",
                    code="job_timeout",
                    status=504,
                )
            )
            return
        if job.status != JobStatus.succeeded:
            yield _error(job_failure(job))
            return
        result = await outcome.result(
            links.storage,
            links.base_url,
            links.expiry,
            submission.principal.image_retention_seconds,
        )
        for item in result.data:
            yield _event(
                f"{prefix}.completed",
                {
                    "type": f"{prefix}.completed",
                    "b64_json": item.b64_json,
                    "created_at": result.created,
                    "usage": token_usage(job.usage) or NO_USAGE,
                    **shape,
                },
            )

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
