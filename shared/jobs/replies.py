"""A finished job's result, handed by the worker to the request waiting for it.

A sync request waits for its job, and the worker holds the images' bytes when it
records the job. So for a job whose request waits (``reply`` in its message), the
worker leaves the result in Redis (``imagegen:reply:{job}``, a short TTL) right
after the commit and before it announces the change; the waiting request takes
it (GETDEL) and answers from it, without re-reading the rows or the images from
storage. The SQL rows stay the truth: without a reply (no Redis, expired, a job
re-published by the sweeper) the request reads them as before.
"""

from __future__ import annotations

import base64
import logging
from datetime import datetime
from typing import Any

import redis
from pydantic import BaseModel

from shared.core.events import (
    CHANNEL,
    async_redis_client,
    changed_message,
    publish_changed,
    redis_client,
)
from shared.jobs.models import Image, Job, JobStatus

log = logging.getLogger(__name__)

# The waiter takes its reply within milliseconds of the change; the TTL only
# bounds what a reply nobody took (the request gave up) keeps in Redis.
REPLY_TTL_SECONDS = 30


class ReplyImage(BaseModel):
    """What the answer shows of an image (``shared.jobs.views.StoredImage``)."""

    storage_key: str
    revised_prompt: str | None = None
    b64_json: str | None = None


class Reply(BaseModel):
    status: JobStatus
    finished_at: datetime | None = None
    usage: dict[str, Any] | None = None
    served_by: dict[str, str] | None = None
    cost_usd: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    images: list[ReplyImage] = []

    def apply(self, job: Job) -> list[str] | None:
        """Bring the in-memory ``job`` to its recorded end; for a ``b64_json``
        request, the images' base64 data."""
        job.status = self.status
        job.finished_at = self.finished_at
        job.usage = self.usage
        job.served_by = self.served_by
        job.cost_usd = self.cost_usd
        job.error_code = self.error_code
        job.error_message = self.error_message
        if not _inline(job):
            return None
        return [i.b64_json or "" for i in self.images]


def _inline(job: Job) -> bool:
    """A ``b64_json`` request: its reply carries the images themselves."""
    return job.request.get("response_format") == "b64_json"


def _key(job_id: str) -> str:
    return f"imagegen:reply:{job_id}"


def leave_reply(job: Job, images: list[Image], data: list[bytes]) -> None:
    """Worker side, after the commit: the job as recorded, with its images' bytes,
    then the change announced (``publish_changed``), in one round trip."""
    client = redis_client()
    if client is None:
        return
    inline = _inline(job)
    reply = Reply(
        status=JobStatus(job.status),
        finished_at=job.finished_at,
        usage=job.usage,
        served_by=job.served_by,
        cost_usd=job.cost_usd,
        error_code=job.error_code,
        error_message=job.error_message,
        images=[
            ReplyImage(
                storage_key=image.storage_key,
                revised_prompt=image.revised_prompt,
                b64_json=base64.b64encode(blob).decode() if inline else None,
            )
            for image, blob in zip(images, data, strict=True)
        ]
        if job.status == JobStatus.succeeded
        else [],
    )
    try:
        # In order, without MULTI: the reply is there before anyone hears of the change.
        with client.pipeline(transaction=False) as pipe:
            pipe.set(_key(job.id), reply.model_dump_json(), ex=REPLY_TTL_SECONDS)
            pipe.publish(CHANNEL, changed_message(job.id, job.status))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not leave the reply of %s: %s", job.id, exc)
        publish_changed(job.id, job.status)  # the waiter then reads the rows


async def take_reply(job_id: str) -> Reply | None:
    """API side: the reply the worker left, taken once; None if there is none."""
    client = async_redis_client()
    if client is None:
        return None
    try:
        raw = await client.getdel(_key(job_id))
    except redis.RedisError as exc:
        log.warning("could not take the reply of %s: %s", job_id, exc)
        return None
    return None if raw is None else Reply.model_validate_json(raw)
