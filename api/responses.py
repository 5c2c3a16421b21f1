"""Responses of the routes that answer something other than JSON. (Their OpenAPI
entries name the media type in ``responses``: as a route's ``response_class`` it
would also move the JSON error answers under that media type.)"""

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
