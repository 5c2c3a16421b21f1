"""Hostile input never gets a 5xx: every route answers in its surface's error shape,
naming the param, before anything is recorded (PostgreSQL behind the API, as deployed).

The table covers what no store can hold (NUL, lone surrogates), strings longer than
their column, numbers and dates out of range, and lists past what one query binds.
A sweep over every route in the OpenAPI document adds NUL to each path and query
parameter.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack

ADMIN = "sk-admin-test"
PROJECT = "alpha"  # the project of stack.key_a
NUL = "a\u0000b"
SURROGATE = "\udfff"
LONG = "x" * 600
HUGE = 10**30
WEAVE = "weave"
MANY_IDS = [f"id-{i}" for i in range(70_000)]


def raw_json(value: Any) -> bytes:
    """JSON as a hostile client writes it: lone surrogates escaped, not refused."""
    return json.dumps(value, ensure_ascii=True).encode()


# (case, method, path, JSON body or None, query, expected param)
BODY_CASES: list[tuple[str, str, str, Any, Any, str]] = [
    ("prompt NUL", "POST", "/v1/images/generations", {"prompt": NUL}, None, "prompt"),
    (
        "user surrogate",
        "POST",
        "/v1/images/generations",
        {"prompt": "p", "user": SURROGATE},
        None,
        "user",
    ),
    ("model NUL", "POST", "/v1/images/generations", {"prompt": "p", "model": NUL}, None, "model"),
    (
        "webhook_url NUL",
        "POST",
        "/v1/images/generations",
        {"prompt": "p", "webhook_url": f"http://example.com/{NUL}"},
        None,
        "webhook_url",
    ),
    (
        "webhook_events NUL",
        "POST",
        "/v1/images/generations",
        {"prompt": "p", "webhook_events": [NUL]},
        None,
        "webhook_events.0",
    ),
    ("key NUL", "POST", "/v1/images/generations", {"prompt": "p", NUL: 1}, None, NUL),
    (
        "user too long",
        "POST",
        "/v1/images/generations",
        {"prompt": "p", "user": "u" * 10_000},
        None,
        "user",
    ),
    ("n huge", "POST", "/v1/images/generations", {"prompt": "p", "n": HUGE}, None, "n"),
    (
        "size overlong",
        "POST",
        "/v1/images/generations",
        {"prompt": "p", "size": LONG},
        None,
        "size",
    ),
    (
        "native batch custom_id too long",
        "POST",
        "/v1/images/batches",
        {"requests": [{"custom_id": LONG, "prompt": "p"}]},
        None,
        "requests.0.custom_id",
    ),
    (
        "native batch custom_id NUL",
        "POST",
        "/v1/images/batches",
        {"requests": [{"custom_id": NUL, "prompt": "p"}]},
        None,
        "requests.0.custom_id",
    ),
    (
        "native batch prompt NUL",
        "POST",
        "/v1/images/batches",
        {"prompts": ["ok", NUL]},
        None,
        "prompts.1",
    ),
    (
        "native batch metadata too long",
        "POST",
        "/v1/images/batches",
        {"prompts": ["p"], "metadata": {"k": LONG}},
        None,
        "metadata",
    ),
    (
        "batch input_file_id NUL",
        "POST",
        "/v1/batches",
        {"input_file_id": NUL, "endpoint": "/v1/images/generations", "completion_window": "24h"},
        None,
        "input_file_id",
    ),
    (
        "batch metadata surrogate",
        "POST",
        "/v1/batches",
        {
            "input_file_id": "file-x",
            "endpoint": "/v1/images/generations",
            "completion_window": "24h",
            "metadata": {"k": SURROGATE},
        },
        None,
        "metadata.k",
    ),
    (
        "endpoint description NUL",
        "POST",
        "/v1/webhooks/endpoints",
        {"url": "https://example.com/hook", "description": NUL},
        None,
        "description",
    ),
    (
        "endpoint events too many",
        "POST",
        "/v1/webhooks/endpoints",
        {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"] * 1000},
        None,
        "events",
    ),
    (
        "admin images_per_day huge",
        "POST",
        "/v1/admin/projects",
        {"name": "huge-limits", "images_per_day": HUGE},
        None,
        "images_per_day",
    ),
    (
        "admin rpm huge",
        "PATCH",
        f"/v1/admin/projects/{PROJECT}",
        {"key_requests_per_minute": HUGE},
        None,
        "key_requests_per_minute",
    ),
    ("admin project name NUL", "POST", "/v1/admin/projects", {"name": NUL}, None, "name"),
    (
        "admin key user surrogate",
        "POST",
        "/v1/admin/keys",
        {"project": PROJECT, "user": SURROGATE},
        None,
        "user",
    ),
    ("usage end_date far", "GET", "/v1/usage", None, {"end_date": "9999-12-31"}, "end_date"),
    (
        "usage start_date far back",
        "GET",
        "/v1/usage",
        None,
        {"start_date": "0001-01-01", "end_date": "0001-01-02"},
        "start_date",
    ),
    ("jobs after NUL", "GET", "/v1/images/jobs", None, {"after": NUL}, "after"),
    ("jobs limit huge", "GET", "/v1/images/jobs", None, {"limit": str(HUGE)}, "limit"),
    (
        "items after huge",
        "GET",
        "/v1/images/batches/batch_x/items",
        None,
        {"after": str(HUGE)},
        "after",
    ),
    ("deliveries job_id NUL", "GET", "/v1/webhooks/deliveries", None, {"job_id": NUL}, "job_id"),
    (
        "weave prompt NUL",
        "POST",
        "/image/create",
        {"project_id": PROJECT, "inputs": {"model": "procedural", "prompt": NUL}},
        WEAVE,
        "inputs.prompt",
    ),
    ("weave call id NUL", "POST", "/call/read", {"project_id": PROJECT, "id": NUL}, WEAVE, "id"),
    (
        "weave limit huge",
        "POST",
        "/calls/stream_query",
        {"project_id": PROJECT, "limit": 10**20},
        WEAVE,
        "limit",
    ),
    (
        "weave offset huge",
        "POST",
        "/calls/stream_query",
        {"project_id": PROJECT, "offset": 10**20},
        WEAVE,
        "offset",
    ),
    (
        "weave 70,000 call ids",
        "POST",
        "/calls/stream_query",
        {"project_id": PROJECT, "filter": {"call_ids": MANY_IDS}},
        WEAVE,
        "filter.call_ids",
    ),
    (
        "weave stats 70,000 trace ids",
        "POST",
        "/calls/query_stats",
        {"project_id": PROJECT, "filter": {"trace_ids": MANY_IDS}},
        WEAVE,
        "filter.trace_ids",
    ),
    ("weave project NUL", "POST", "/calls/query_stats", {"project_id": NUL}, WEAVE, "project_id"),
]


def headers_for(stack: Stack, path: str) -> dict[str, str]:
    key = ADMIN if path.startswith("/v1/admin") else stack.key_a
    return {"Authorization": f"Bearer {key}"}


def assert_names_param(resp: httpx.Response, param: str) -> None:
    assert resp.status_code < 500, resp.text
    if resp.url.path.startswith(("/image/", "/call/", "/calls/")):
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert detail[0]["loc"][1:] == param.split("."), detail
    else:
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, error


@pytest.mark.parametrize(
    ("method", "path", "body", "query", "param"),
    [c[1:] for c in BODY_CASES],
    ids=[c[0] for c in BODY_CASES],
)
def test_bad_input_answers_in_the_surfaces_shape_naming_the_param(
    stack: Stack, method: str, path: str, body: Any, query: dict[str, str] | str | None, param: str
) -> None:
    params = query if isinstance(query, dict) else None
    content = raw_json(body) if body is not None else None
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        resp = client.request(
            method,
            path,
            content=content,
            params=params,
            headers={**headers_for(stack, path), "Content-Type": "application/json"},
        )
    assert_names_param(resp, param)


def test_nothing_was_recorded_for_refused_input(stack: Stack) -> None:
    """A refused request made no job: a client retrying it makes none either."""
    with httpx.Client(
        base_url=stack.base_url, timeout=60, headers=headers_for(stack, "/v1")
    ) as client:
        before = client.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
        for _ in range(2):
            resp = client.post(
                "/v1/images/generations",
                content=raw_json({"prompt": "p", "user": SURROGATE}),
                headers={"Content-Type": "application/json"},
            )
            assert resp.status_code == 400
        after = client.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
    assert [j["id"] for j in after] == [j["id"] for j in before]


def multipart(filename: str, purpose: str) -> tuple[bytes, str]:
    """A multipart body written by hand: httpx would percent-encode a NUL."""
    boundary = "imagegen-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        f'{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: application/jsonl\r\n\r\n{{}}\n\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_upload_with_bad_filename_or_purpose_answers_400(stack: Stack) -> None:
    with httpx.Client(
        base_url=stack.base_url, timeout=60, headers=headers_for(stack, "/v1")
    ) as client:
        for filename, purpose, param in [
            (LONG + ".jsonl", "batch", "file"),
            (f"{NUL}.jsonl", "batch", "file"),
            ("in.jsonl", NUL, "purpose"),
        ]:
            body, ctype = multipart(filename, purpose)
            resp = client.post("/v1/files", content=body, headers={"Content-Type": ctype})
            assert_names_param(resp, param)


def _routes(stack: Stack) -> list[tuple[str, str, list[str], list[str]]]:
    spec = httpx.get(f"{stack.base_url}/openapi.json", timeout=30).json()
    found = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            found.append(
                (
                    method.upper(),
                    path,
                    [p["name"] for p in params if p["in"] == "path"],
                    [p["name"] for p in params if p["in"] == "query"],
                )
            )
    return found


def test_nul_in_any_path_or_query_parameter_of_any_route_answers_400(stack: Stack) -> None:
    routes = _routes(stack)
    assert len(routes) > 30
    tried = 0
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for method, path, path_params, query_params in routes:
            headers = {**headers_for(stack, path), "Content-Type": "application/json"}
            body = b"{}" if method in ("POST", "PATCH", "PUT") else None
            for name in path_params:
                url = path
                for other in path_params:
                    url = url.replace("{" + other + "}", "a%00b" if other == name else "x")
                resp = client.request(method, url, headers=headers, content=body)
                assert_names_param(resp, name)
                tried += 1
            plain = path
            for other in path_params:
                plain = plain.replace("{" + other + "}", "x")
            for name in query_params:
                resp = client.request(
                    method, plain, params={name: NUL}, headers=headers, content=body
                )
                assert_names_param(resp, name)
                tried += 1
    assert tried > 20


def test_the_connection_stays_usable_after_an_error_answer(stack: Stack) -> None:
    """Keep-alive survives a refused request: the next one on the same socket works."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    bad = raw_json({"prompt": "p", "user": SURROGATE})
    request = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {stack.key_a}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(bad)}\r\n\r\n"
    ).encode() + bad
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        first = _read_response(sock)
        assert first.startswith(b"HTTP/1.1 400")
        assert b"connection: close" not in first.lower()
        sock.sendall(health)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


METADATA_URL = "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/"  # NAT64 of 169.254.169.254


def test_an_embedded_metadata_address_is_refused_on_every_surface(stack: Stack) -> None:
    """The stack allows private targets (its receivers are on loopback); metadata
    addresses stay refused anyway, whichever surface names the webhook."""
    with httpx.Client(
        base_url=stack.base_url, timeout=60, headers=headers_for(stack, "/v1")
    ) as client:
        for path, body, param in [
            ("/v1/images/generations", {"prompt": "p", "webhook_url": METADATA_URL}, "webhook_url"),
            ("/v1/images/batches", {"prompts": ["p"], "webhook_url": METADATA_URL}, "webhook_url"),
            ("/v1/webhooks/endpoints", {"url": METADATA_URL}, "url"),
        ]:
            resp = client.post(path, json=body)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == param
            assert "metadata" in resp.json()["error"]["message"]
        weave = client.post(
            "/image/create",
            json={
                "project_id": PROJECT,
                "webhook_url": METADATA_URL,
                "inputs": {"model": "procedural", "prompt": "p"},
            },
        )
    # Weave's reference answers a request the provider would refuse with 200 and
    # the error in the response, and no call.
    assert weave.status_code == 200
    assert "metadata" in weave.json()["response"]["error"]
    assert weave.json()["weave_call_id"] is None


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_an_oversize_upload_is_refused_without_holding_it(stack: Stack) -> None:
    from shared.files.service import MAX_FILE_BYTES

    assert stack.api.proc is not None
    pid = stack.api.proc.pid
    port = int(stack.base_url.rsplit(":", 1)[1])
    before = _rss_kib(pid)
    # Declared too large: refused from the headers alone.
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.key_a}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {MAX_FILE_BYTES + 10 * 2**20}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "file_too_large"

    # Undeclared (chunked): counted as it arrives and cut off at the limit.
    chunk = b"{}\n" * (2**20 // 3)
    sent = 0

    def body() -> Any:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        while sent < MAX_FILE_BYTES + 20 * 2**20:
            sent += len(chunk)
            yield chunk

    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        try:
            resp = client.post(
                "/v1/files",
                content=body(),
                headers={
                    **headers_for(stack, "/v1"),
                    "Content-Type": "multipart/form-data; boundary=b",
                },
            )
            assert resp.status_code == 413, resp.text
            assert resp.json()["error"]["code"] == "file_too_large"
        except httpx.TransportError:
            pass  # the server may close while the client still sends; no file either way
        files = client.get("/v1/files", headers=headers_for(stack, "/v1")).json()["data"]
    assert "big.jsonl" not in [f["filename"] for f in files]
    # Never more than the limit spooled, and nothing of it held in memory.
    assert (_rss_kib(pid) - before) < 48 * 1024, (before, _rss_kib(pid))


def test_a_huge_json_body_without_a_key_is_refused_without_holding_it(stack: Stack) -> None:
    """300 MiB of JSON and no key grew the API by 906 MiB before it answered 401: now
    it is answered before a byte of the body is read, with a wrong key likewise,
    and with a valid key it is cut off at IMAGEGEN_MAX_BODY_BYTES."""
    assert stack.api.proc is not None
    pid = stack.api.proc.pid
    port = int(stack.base_url.rsplit(":", 1)[1])
    before = _rss_kib(pid)
    for key, status, code in (
        ("", b"401", "missing_api_key"),
        ("Authorization: Bearer sk-wrong\r\n", b"401", "invalid_api_key"),
        (f"Authorization: Bearer {stack.key_a}\r\n", b"413", "request_too_large"),
    ):
        head = (
            "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\n{key}Content-Length: {300 * 2**20}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head)
            answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == code

    chunk = b'{"prompt": "' + b"a" * (2**20)

    def body() -> Any:
        for _ in range(300):
            yield chunk

    for headers, status_code in (
        ({}, 401),
        ({"Authorization": "Bearer sk-wrong"}, 401),
        ({"Authorization": f"Bearer {stack.key_a}"}, 413),
    ):
        with httpx.Client(base_url=stack.base_url, timeout=120) as client:
            try:
                resp = client.post(
                    "/v1/images/generations",
                    content=body(),
                    headers={"Content-Type": "application/json", **headers},
                )
                assert resp.status_code == status_code, resp.text
            except httpx.TransportError:
                pass  # the server may close while the client still sends
    assert (_rss_kib(pid) - before) < 48 * 1024, (before, _rss_kib(pid))


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (reading whatever it sent
    first), or None if it was still open after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def test_a_client_sending_its_headers_slowly_is_cut_off(stack: Stack) -> None:
    """IMAGEGEN_CLIENT_TIMEOUT_SECONDS is 3 in the test stack; before, the server
    held such a connection forever."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        closed = _closed_within(sock, 10)
    assert closed is not None
    assert closed < 8
    # Between two requests on one connection too: the second one's headers trickle.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_within(sock, 10) is not None


def test_a_client_sending_its_body_slowly_gets_408(stack: Stack) -> None:
    port = int(stack.base_url.rsplit(":", 1)[1])
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {stack.key_a}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head + b'{"prompt": ')  # and then nothing
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
