"""Response classes of the routes that answer something other than JSON, so the
OpenAPI document names their real media type instead of an empty JSON body."""

from __future__ import annotations

from fastapi.responses import Response, StreamingResponse


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


class JSONLinesStream(StreamingResponse):
    media_type = "application/jsonl"


class JSONLinesFile(Response):
    media_type = "application/jsonl"


class ImageFile(Response):
    media_type = "image/png"  # or jpeg/webp: the stored image's own type
