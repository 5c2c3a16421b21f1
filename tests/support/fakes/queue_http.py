"""What the fakes of queue providers (``replicate``, ``fal``) share: a JSON handler,
a server on 127.0.0.1 in a thread, the pictures they answer with, and how their
image models read an input file (a data URI: RFC 2397, base64) and make an edit of
it."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from tests.support.fake_upstream import _Server

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


def picture(width: int, height: int, fmt: str, index: int, black: bool = False) -> bytes:
    """A flat picture of ``width`` x ``height`` in ``fmt``, its colour by ``index``."""
    colour = (0, 0, 0) if black else (40 + index * 50 % 200, 120, 200)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format=PIL_FORMATS.get(fmt, "PNG"))
    return buf.getvalue()


# What an inpainting model paints where the mask is white.
PAINT = (0, 0, 255)
DATA_URI = re.compile(r"^data:(image/(?:png|jpeg|webp));base64,(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Schema:
    """An image model's file inputs: ``files`` one file each, ``lists`` a list of
    files; ``required`` among them; which is the ``mask`` (white: inpainted);
    whether it takes (and needs) a ``prompt``."""

    files: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    mask: str | None = None
    prompt: bool = True

    def inputs(
        self, model_input: dict[str, Any], file: Callable[[Any], Image.Image | None]
    ) -> tuple[Image.Image | None, Image.Image | None]:
        """The input image (the first of a list) and the mask, where given, opened
        by ``file``."""
        names = [n for n in self.files + self.lists if n != self.mask and n in model_input]
        source = None
        if names:
            value = model_input[names[0]]
            source = file(value[0] if isinstance(value, list) and value else value)
        given = self.mask is not None and self.mask in model_input
        return source, file(model_input[self.mask]) if given and self.mask else None

    def problem(
        self, model_input: dict[str, Any], file: Callable[[Any], Image.Image | None]
    ) -> tuple[str, str] | None:
        """(the input, what is wrong with it) where a file input is missing or no
        readable image, else None."""
        for name in self.required:
            if name not in model_input:
                return name, "missing"
        for name in self.files + self.lists:
            if name not in model_input:
                continue
            value = model_input[name]
            if name in self.lists and not isinstance(value, list):
                return name, "not a list"
            values = value if isinstance(value, list) else [value]
            if not values or any(file(each) is None for each in values):
                return name, "not a readable image file"
        return None


def data_uri_file(value: Any) -> bytes | None:
    """The file a ``data:image/...;base64,...`` input carries, or None where the value
    is no such URI or its base64 is bad."""
    match = DATA_URI.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    try:
        return base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return None


def opened(data: bytes | None) -> Image.Image | None:
    """``data`` as a picture, or None where it is none."""
    if data is None:
        return None
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except Exception:  # Pillow raises several unrelated types here
        return None
    return picture


def edited(
    source: Image.Image, mask: Image.Image | None, size: tuple[int, int] | None, fmt: str
) -> bytes:
    """What an image model makes of an input: the input at ``size`` (its own where
    none), with the mask's white pixels painted over (an inpainting model's), in
    ``fmt``."""
    out = source.convert("RGB")
    if mask is not None:
        out.paste(PAINT, (0, 0, *out.size), mask.convert("L").resize(out.size))
    if size is not None and size != out.size:
        out = out.resize(size)
    buf = io.BytesIO()
    out.save(buf, format=PIL_FORMATS.get(fmt, "PNG"))
    return buf.getvalue()


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def send_bytes(
        self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def read_raw(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def read_body(self) -> Any:
        """The request's JSON body; None when it has none or it is not JSON."""
        raw = self.read_raw()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None


class Served:
    """A server of ``handler`` on 127.0.0.1 in a thread of its own."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", port), handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.files: dict[str, tuple[bytes, str]] = {}
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start_serving(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
