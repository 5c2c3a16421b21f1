"""How the OpenAPI document shows answers that are not one JSON object: server-sent
events, image bytes, JSON lines.

Routes that answer these also set ``response_class=Response``: FastAPI would
otherwise document an empty ``application/json`` answer beside the real one, and
show their JSON error answers under the stream's media type.
"""

from __future__ import annotations

from typing import Any

from api.errors import ERRORS
from shared.jobs.schemas import JobObject


def answer(media_type: str, description: str, binary: bool = False) -> dict[int | str, Any]:
    """The 200 answer of a route, in ``media_type``."""
    schema = {"type": "string", "format": "binary"} if binary else {"type": "string"}
    return {200: {"description": description, "content": {media_type: {"schema": schema}}}}


def event_stream(events: str) -> dict[int | str, Any]:
    return answer("text/event-stream", f"Server-sent events: {events}")


# Generations, edits and variations: the images (JSON), OpenAI's image events with
# ``stream: true``, or the job with ``Prefer: respond-async``.
IMAGE_ANSWERS: dict[int | str, Any] = {
    200: {
        "description": "The images; with `stream: true`, server-sent events",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "`image_generation.partial_image` (or "
                    "`image_edit.partial_image`) events, then `*.completed` with the "
                    "image and `usage`, as OpenAI streams them",
                }
            }
        },
    },
    202: {"model": JobObject, "description": "Accepted (`Prefer: respond-async`); poll the job"},
    **ERRORS,
}
