"""A fake OpenAI-compatible image upstream speaking the real protocol over HTTP.

Behaviour is chosen by markers in the prompt, counted per prompt:
``[429-once]`` answers 429 with Retry-After first, ``[500-once]`` a 500 first,
``[content-policy]`` a 400 content_policy_violation, ``[hang]`` never answers in
time, ``[slow=S]`` waits S seconds, ``[garbage]`` returns bytes that are no image.
``response_format: url`` answers with URLs served by this same server.

A deployment's behaviour, whatever the prompt, by attributes: ``mode`` ("429",
"500", "empty"), ``delay`` (every call admitted waits that long: a slow
upstream) and ``images_per_minute`` (a rate limit). The rate limit follows
OpenAI's published documents:

- the "Rate limits" guide (platform.openai.com/docs/guides/rate-limits): limits
  are per minute but may be quantized, enforced over shorter periods (the help
  centre's "How can I solve 429: 'Too Many Requests' errors?": "1 request per
  second for a 60 RPM limit"). Here a token bucket of images holding one
  second's worth (``images_per_minute / 60``, at least 1), refilled
  continuously. A call of ``n`` images passes when the bucket holds ``n`` (or
  all of its capacity, for an ``n`` larger than that) and takes ``n``: the rate
  over time is the limit exactly. A refused call takes nothing. Every answer
  carries the guide's headers ``x-ratelimit-limit-requests`` (the per-minute
  limit), ``x-ratelimit-remaining-requests`` (whole images the bucket holds now)
  and ``x-ratelimit-reset-requests`` (until the bucket is full, in the guide's
  form: ``12ms``, ``1s``, ``6m0s``);
- the "Error codes" guide (platform.openai.com/docs/guides/error-codes): past
  the limit, 429 "Rate limit reached for requests", in the API's error shape
  ``{"error": {"message": "Rate limit reached for ...", "type": "requests",
  "param": null, "code": "rate_limit_exceeded"}}``, the message in the form of
  OpenAI's own (the limit, the images requested, "Please try again in 500ms").
  Neither guide promises a ``Retry-After`` header; OpenAI's SDKs honour
  ``retry-after-ms`` and then ``retry-after`` where one is sent
  (openai-python's ``_parse_retry_after_header``), as this project's provider
  does. The fake sends both: ``Retry-After`` in whole seconds (RFC 9110,
  rounded up) and ``retry-after-ms``, until the bucket holds enough.

``rate_limited`` counts the 429s sent (the rate limit's, ``mode`` "429"'s and
``[429-once]``'s).

``python -m tests.support.fake_upstream --port P --images-per-minute N --delay S``
serves one until killed (a benchmark's deployment in a process of its own) and
prints its base URL.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

EXPECTED_KEY = "sk-upstream-test"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # thousands of calls at once (bench_capacity)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) is expected here


class TokenBucket:
    """Images a minute, enforced per second as OpenAI quantizes its limits: a
    bucket of one second's worth (at least 1), refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("images_per_minute must be positive")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # images a second
        self.capacity = max(1.0, self.rate)
        self._clock = clock
        self.tokens = self.capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, images: int) -> float:
        """Take ``images`` and answer 0, or take nothing and answer the seconds until
        the bucket holds enough (a call larger than the bucket needs it full)."""
        self._refill()
        need = min(float(images), self.capacity)
        if self.tokens >= need:
            self.tokens -= images  # below zero for a call larger than the bucket
            return 0.0
        return (need - self.tokens) / self.rate

    def remaining(self) -> int:
        self._refill()
        return max(0, math.floor(self.tokens))

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return max(0.0, self.capacity - self.tokens) / self.rate


def _duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: ``12ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class FakeUpstream:
    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.calls: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.files: dict[str, bytes] = {}
        self._noise: dict[tuple[int, int], bytes] = {}
        self.gate = threading.Event()  # "[gate]" calls answer once it is set
        # A deployment's failure, whatever the prompt: "429" (Retry-After: 30),
        # "500", or "empty" (200 with no image); None answers as asked.
        self.mode: str | None = None
        self.delay = 0.0  # seconds every admitted call waits: a slow upstream
        self.rate_limited = 0  # the 429s sent
        self._bucket: TokenBucket | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = _Server((host, port), self._handler())
        self.port = self.server.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        # Stopped within 50 ms (shutdown waits for the loop's next poll).
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def images_per_minute(self) -> int | None:
        """The rate limit (None: none); setting it starts a full bucket."""
        return None if self._bucket is None else self._bucket.per_minute

    @images_per_minute.setter
    def images_per_minute(self, value: int | None) -> None:
        with self.lock:
            self._bucket = None if value is None else TokenBucket(value)

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def noise_answer(self, width: int, height: int) -> bytes:
        """One answer of one image half noise, half flat: its PNG about as large as a
        generated picture's (1.6 MB at 1024x1024). Made once per size and then
        shared, so thousands of calls answered at once cost this process nothing."""
        with self.lock:
            if (width, height) not in self._noise:
                picture = Image.new("RGB", (width, height), (90, 120, 150))
                noisy = height // 2
                picture.paste(Image.frombytes("RGB", (width, noisy), os.urandom(width * noisy * 3)))
                buf = io.BytesIO()
                picture.save(buf, format="PNG")
                item = {"b64_json": base64.b64encode(buf.getvalue()).decode()}
                body = {"created": int(time.time()), "data": [item]}
                self._noise[(width, height)] = json.dumps(body).encode()
            return self._noise[(width, height)]

    def calls_for(self, marker: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if marker in c["body"].get("prompt", "")]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes: with Nagle's algorithm the body
            # waited for the client's delayed ACK of the headers, 40 ms on a reused
            # connection (every sequential request of a benchmark, on either side).
            # Real providers' servers do not add that.
            disable_nagle_algorithm = True
            limit_headers: dict[str, str]  # the rate limit's, on every answer of a call

            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self,
                status: int,
                body: bytes,
                ctype: str = "application/json",
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in {**self.limit_headers, **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(
                self,
                status: int,
                message: str,
                code: str | None,
                headers: dict[str, str] | None = None,
                kind: str = "invalid_request_error",
            ) -> None:
                body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
                if status == 429:
                    with upstream.lock:
                        upstream.rate_limited += 1
                self._send(status, json.dumps(body).encode(), headers=headers)

            def _over_limit(self, images: int) -> bool:
                """Past the rate limit: answer 429 as OpenAI does (True); else note
                the limit's headers for the answer (False)."""
                with upstream.lock:
                    bucket = upstream._bucket
                    if bucket is None:
                        return False
                    wait = bucket.take(images)
                    self.limit_headers = {
                        "x-ratelimit-limit-requests": str(bucket.per_minute),
                        "x-ratelimit-remaining-requests": str(bucket.remaining()),
                        "x-ratelimit-reset-requests": _duration(bucket.reset_in()),
                    }
                if not wait:
                    return False
                self._error(
                    429,
                    f"Rate limit reached for images per min (fake upstream): Limit "
                    f"{bucket.per_minute}, Requested {images}. Please try again in "
                    f"{_duration(wait)}.",
                    "rate_limit_exceeded",
                    {
                        "Retry-After": str(max(1, math.ceil(wait))),
                        "retry-after-ms": str(math.ceil(wait * 1000)),
                    },
                    kind="requests",
                )
                return True

            def do_GET(self) -> None:
                self.limit_headers = {}
                name = self.path.rsplit("/", 1)[-1]
                data = upstream.files.get(name)
                if data is None:
                    self._send(404, b"{}")
                else:
                    self._send(200, data, "image/png")

            def do_POST(self) -> None:
                self.limit_headers = {}  # one connection carries many calls
                with upstream.lock:
                    upstream.in_flight += 1
                    upstream.max_in_flight = max(upstream.max_in_flight, upstream.in_flight)
                try:
                    self._post()
                finally:
                    with upstream.lock:
                        upstream.in_flight -= 1

            def _post(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                ctype = self.headers.get("Content-Type", "")
                body = (
                    _form(ctype, raw)
                    if ctype.startswith("multipart/")
                    else json.loads(raw or b"{}")
                )
                prompt = body.get("prompt", "")
                with upstream.lock:
                    upstream.counts[prompt] += 1
                    count = upstream.counts[prompt]
                    upstream.calls.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                if self.path not in (
                    "/v1/images/generations",
                    "/v1/images/edits",
                    "/v1/images/variations",
                ):
                    return self._error(404, "not found", None)
                if self.headers.get("Authorization") != f"Bearer {EXPECTED_KEY}":
                    return self._error(401, "Incorrect API key provided", "invalid_api_key")
                if self._over_limit(int(body.get("n") or 1)):
                    return None
                if upstream.delay:
                    time.sleep(upstream.delay)
                if upstream.mode == "429":
                    return self._error(
                        429, "Rate limit reached", "rate_limit_exceeded", {"Retry-After": "30"}
                    )
                if upstream.mode == "500":
                    return self._error(500, "The server had an error", None)
                if upstream.mode == "empty":
                    return self._send(200, json.dumps({"created": 0, "data": []}).encode())
                if body.get("model") == "fake-n1-upstream" and body.get("n", 1) != 1:
                    return self._error(400, "n must be 1 for this model", "invalid_value")
                if "[429-once]" in prompt and count == 1:
                    return self._error(
                        429, "Rate limit reached", "rate_limit_exceeded", {"Retry-After": "1"}
                    )
                if "[500-once]" in prompt and count == 1:
                    return self._error(500, "The server had an error", None)
                if "[content-policy]" in prompt:
                    return self._error(
                        400,
                        "Your request was rejected as a result of our safety system.",
                        "content_policy_violation",
                    )
                if "[hang]" in prompt:
                    time.sleep(30)
                    return self._error(500, "too late", None)
                if "[gate]" in prompt:  # held until the test opens the gate
                    upstream.gate.wait(600)
                slow = re.search(r"\[slow=([\d.]+)\]", prompt)
                if slow:
                    time.sleep(float(slow.group(1)))
                size = str(body.get("size") or "64x64")
                if size == "auto":  # a GPT image model's choice: square here
                    size = "1024x1024"
                width, height = (int(v) for v in size.split("x"))
                if "[noise]" in prompt:  # a realistic image's bytes (bench_capacity)
                    return self._send(200, upstream.noise_answer(width, height))
                data = []
                for i in range(int(body.get("n", 1))):
                    if "[garbage]" in prompt:
                        png = b"this is not an image"
                    else:
                        buf = io.BytesIO()
                        Image.new("RGB", (width, height), (i * 40 % 256, 80, 160)).save(
                            buf, format="PNG"
                        )
                        png = buf.getvalue()
                    item: dict[str, Any] = {"revised_prompt": f"revised: {prompt}"}
                    if body.get("response_format") == "url":
                        name = f"{uuid.uuid4().hex}.png"
                        upstream.files[name] = png
                        item["url"] = f"http://127.0.0.1:{upstream.port}/files/{name}"
                    else:
                        item["b64_json"] = base64.b64encode(png).decode()
                    data.append(item)
                resp: dict[str, Any] = {"created": int(time.time()), "data": data}
                if body.get("model") == "gpt-image-1":
                    resp["usage"] = {
                        "input_tokens": 10,
                        "output_tokens": 100,
                        "total_tokens": 110,
                        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
                        "output_tokens_details": {"image_tokens": 100, "text_tokens": 0},
                    }
                if body.get("stream") in (True, "true"):
                    return self._send(200, _stream(body, resp), "text/event-stream")
                self._send(200, json.dumps(resp).encode())

        return Handler


def _form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart form (edits, variations) as the JSON body a generation sends, with
    its files counted by field (``_files``) and their image sizes (``_sizes``)."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    body: dict[str, Any] = {"_files": {}, "_sizes": []}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename() is not None:
            body["_files"][name] = body["_files"].get(name, 0) + 1
            body["_sizes"].append(Image.open(io.BytesIO(payload)).size)
        else:
            value = payload.decode()
            body[str(name)] = int(value) if name == "n" else value
    return body


def _stream(body: dict[str, Any], resp: dict[str, Any]) -> bytes:
    """OpenAI's image event stream: for each image its partial images (the final
    picture, scaled down and up again), then the completed image."""
    prefix = "image_edit" if "_files" in body else "image_generation"
    events = []
    for item in resp["data"]:
        final = base64.b64decode(item["b64_json"])
        picture = Image.open(io.BytesIO(final))
        for k in range(int(body.get("partial_images", 0))):
            buf = io.BytesIO()
            coarse = picture.resize((max(1, picture.width // 4), max(1, picture.height // 4)))
            coarse.resize(picture.size).save(buf, format="PNG")
            events.append(
                {
                    "type": f"{prefix}.partial_image",
                    "partial_image_index": k,
                    "b64_json": base64.b64encode(buf.getvalue()).decode(),
                }
            )
        events.append(
            {
                "type": f"{prefix}.completed",
                "b64_json": item["b64_json"],
                "usage": resp.get("usage"),
            }
        )
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def main(argv: list[str] | None = None) -> None:
    """Serve one fake upstream until killed, its base URL printed first."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_upstream",
        description="A fake OpenAI-compatible image upstream, served until killed.",
    )
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--images-per-minute", type=int, default=None, help="a rate limit")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every call waits")
    parser.add_argument(
        "--mode", choices=["429", "500", "empty"], default=None, help="fail every call"
    )
    args = parser.parse_args(argv)
    if args.images_per_minute is not None and args.images_per_minute <= 0:
        parser.error("--images-per-minute must be positive")
    upstream = FakeUpstream(port=args.port, host=args.host)
    upstream.images_per_minute = args.images_per_minute
    upstream.delay = args.delay
    upstream.mode = args.mode
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(upstream.base_url, flush=True)
    try:
        upstream.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        upstream.server.server_close()


if __name__ == "__main__":
    main()
