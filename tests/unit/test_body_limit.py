"""Request bodies are stopped at their route's limit as they arrive
(api/upload_limit.py): a request without a valid key is answered 401 before a byte
of its body is read; a declared length over the limit is refused before a byte is
read; an undeclared one after at most the limit."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI, Request

from api import errors
from api.upload_limit import UploadLimit, body_limit
from shared.core.settings import Settings

SETTINGS = Settings(max_body_bytes=64 * 1024)
CHUNK = 16 * 1024


def app() -> UploadLimit:
    inner = FastAPI()
    errors.install(inner)

    @inner.post("/v1/images/generations")
    async def generations(request: Request) -> dict[str, int]:
        return {"read": len(await request.body())}

    return UploadLimit(inner, SETTINGS, is_valid_key)


async def is_valid_key(key: str) -> bool:
    """The keys table, as this test has it: every key but these two is valid."""
    if key == "sk-db-down":
        raise ConnectionError("the database is down")
    return key != "sk-wrong"


KEYED = [(b"authorization", b"Bearer sk-anything")]


async def call(
    headers: list[tuple[bytes, bytes]], chunks: int, path: str = "/v1/images/generations"
) -> tuple[int, dict[str, Any], int]:
    """(status, JSON answer, body bytes the app pulled) for a body of ``chunks``."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= chunks * CHUNK:
            return {"type": "http.disconnect"}
        pulled += CHUNK
        return {"type": "http.request", "body": b" " * CHUNK, "more_body": pulled < chunks * CHUNK}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "root_path": "",
    }
    await app()(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


@pytest.mark.anyio
async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    status, answer, pulled = await call([*KEYED, (b"content-length", str(300 * 2**20).encode())], 1)
    assert status == 413
    assert answer["error"]["code"] == "request_too_large"
    assert pulled == 0


@pytest.mark.anyio
async def test_an_undeclared_body_is_cut_off_once_past_the_limit() -> None:
    # 300 MiB offered; the app pulls just past the 64 KiB limit, then answers 413.
    status, answer, pulled = await call(KEYED, 300 * 2**20 // CHUNK)
    assert status == 413
    assert "limit of 65536 bytes" in answer["error"]["message"]
    assert pulled <= SETTINGS.max_body_bytes + CHUNK


@pytest.mark.anyio
async def test_a_body_within_the_limit_is_read_whole() -> None:
    status, answer, _ = await call([*KEYED, (b"content-length", str(3 * CHUNK).encode())], 3)
    assert (status, answer) == (200, {"read": 3 * CHUNK})


def test_each_route_has_its_own_limit() -> None:
    settings = Settings(max_body_bytes=2000, edit_max_image_bytes=10, edit_max_images=2)
    assert body_limit("/v1/images/generations", settings) == 2000
    assert body_limit("/image/create", settings) == 2000
    assert body_limit("/v1/files", settings) > 200 * 2**20
    assert body_limit("/v1/images/edits", settings) == 30 + 64 * 1024
    assert body_limit("/v1/images/variations/", settings) == 10 + 64 * 1024
    assert body_limit("/v1/images/batches", settings) == 64 * 2**20


@pytest.mark.anyio
@pytest.mark.parametrize("header", [None, b"authorization", b"x-api-key", b"x-portkey-api-key"])
async def test_a_body_without_any_key_is_refused_401_unread(header: bytes | None) -> None:
    value = b"Bearer sk-something" if header == b"authorization" else b"sk-something"
    headers = [(header, value)] if header else []
    status, answer, pulled = await call(headers, 300 * 2**20 // CHUNK)
    if header is None:
        assert (status, answer["error"]["code"], pulled) == (401, "missing_api_key", 0)
    else:
        assert status == 413  # a valid key: counted up to the limit, as above


@pytest.mark.anyio
async def test_a_body_with_a_wrong_key_is_refused_401_unread() -> None:
    for declared in ([], [(b"content-length", str(300 * 2**20).encode())]):
        headers = [(b"authorization", b"Bearer sk-wrong"), *declared]
        status, answer, pulled = await call(headers, 300 * 2**20 // CHUNK)
        assert (status, answer["error"]["code"], pulled) == (401, "invalid_api_key", 0)
        assert answer["error"]["message"] == "Incorrect API key provided: sk-wro***."


@pytest.mark.anyio
async def test_a_key_lookup_that_fails_leaves_the_answer_to_the_route() -> None:
    # The database down: the body is read (within its limit) and the route answers.
    headers = [(b"authorization", b"Bearer sk-db-down")]
    status, answer, _ = await call(headers, 2)
    assert (status, answer) == (200, {"read": 2 * CHUNK})
