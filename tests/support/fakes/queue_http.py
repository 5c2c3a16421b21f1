"""What the fakes of queue providers (``replicate``, ``fal``) share: a JSON handler,
a server on 127.0.0.1 in a thread, and the pictures they answer with."""

from __future__ import annotations

import io
import json
import threading
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

    def read_body(self) -> Any:
        """The request's JSON body; None when it has none or it is not JSON."""
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
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
