"""Partial images of a streamed request, from the worker to the API process that
streams them: Redis pub/sub on a channel of the job's own, which the API subscribes
to before the job is published. Best effort, as OpenAI's partials are: a partial
nobody hears is lost, the final images are recorded with the job as always. No
Redis (embedded mode): no partials, only the completed events."""

from __future__ import annotations

import base64
import json
import logging

import redis

from shared.core.events import redis_client

log = logging.getLogger(__name__)


def channel(job_id: str) -> str:
    return f"imagegen:partial:{job_id}"


class PartialPublisher:
    """The ``partials`` a provider is given for one streamed job."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def __call__(self, image_index: int, partial_index: int, png: bytes) -> None:
        client = redis_client()
        if client is None:
            return
        message = {
            "image_index": image_index,
            "partial_image_index": partial_index,
            "b64_json": base64.b64encode(png).decode(),
        }
        try:
            client.publish(channel(self.job_id), json.dumps(message))
        except redis.RedisError as exc:
            log.warning("job %s: partial image not sent: %s", self.job_id, exc)
