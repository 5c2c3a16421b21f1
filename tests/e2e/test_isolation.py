"""One project never sees another's data: every endpoint, tried with another
project's key, answers 404/403 or an empty result, never the data."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack

SECRET = "owner's secret prompt"


@pytest.fixture(scope="module")
def owned(stack: Stack) -> dict[str, Any]:
    """A finished job with images and a trace call in project 'owner'."""
    key = stack.create_key("owner")
    job = stack.wait_job(stack.submit(SECRET, key=key)["id"], key)
    assert job["status"] == "succeeded"
    assert job["call_id"]
    intruder = stack.create_key("intruder")
    return {"key": key, "job": job, "intruder": intruder}


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}


Case = Callable[[Stack, dict[str, Any]], httpx.Response]

CASES: dict[str, tuple[Case, set[int]]] = {
    "read job": (
        lambda s, o: httpx.get(
            f"{s.base_url}/v1/images/jobs/{o['job']['id']}",
            headers={"Authorization": f"Bearer {o['intruder']}"},
        ),
        {404},
    ),
    "cancel job": (
        lambda s, o: httpx.post(
            f"{s.base_url}/v1/images/jobs/{o['job']['id']}/cancel",
            headers={"Authorization": f"Bearer {o['intruder']}"},
        ),
        {404},
    ),
    "call read, owner's project": (
        lambda s, o: httpx.post(
            f"{s.base_url}/call/read",
            headers=_basic(o["intruder"]),
            json={"project_id": "owner", "id": o["job"]["call_id"]},
        ),
        {403},
    ),
    "call read, own project": (
        lambda s, o: httpx.post(
            f"{s.base_url}/call/read",
            headers=_basic(o["intruder"]),
            json={"project_id": "intruder", "id": o["job"]["call_id"]},
        ),
        {200},
    ),
    "calls stream": (
        lambda s, o: httpx.post(
            f"{s.base_url}/calls/stream_query",
            headers=_basic(o["intruder"]),
            json={"project_id": "owner"},
        ),
        {403},
    ),
    "calls stream, own project by call id": (
        lambda s, o: httpx.post(
            f"{s.base_url}/calls/stream_query",
            headers=_basic(o["intruder"]),
            json={"project_id": "intruder", "filter": {"call_ids": [o["job"]["call_id"]]}},
        ),
        {200},
    ),
    "calls stats": (
        lambda s, o: httpx.post(
            f"{s.base_url}/calls/query_stats",
            headers=_basic(o["intruder"]),
            json={"project_id": "owner"},
        ),
        {403},
    ),
    "image create in owner's project": (
        lambda s, o: httpx.post(
            f"{s.base_url}/image/create",
            headers=_basic(o["intruder"]),
            json={"project_id": "owner", "inputs": {"model": "procedural", "prompt": "x"}},
        ),
        {403},
    ),
    "list jobs": (
        lambda s, o: httpx.get(
            f"{s.base_url}/v1/images/jobs",
            params={"limit": 100},
            headers={"Authorization": f"Bearer {o['intruder']}"},
        ),
        {200},
    ),
    "usage": (
        lambda s, o: httpx.get(
            f"{s.base_url}/v1/usage", headers={"Authorization": f"Bearer {o['intruder']}"}
        ),
        {200},
    ),
    "local file route": (
        lambda s, o: httpx.get(
            f"{s.base_url}/v1/images/files/x/{o['job']['id']}/0.png",
            params={"expires": 9999999999, "signature": "0" * 64},
        ),
        {404},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_another_projects_key_gets_no_data(stack: Stack, owned: dict[str, Any], name: str) -> None:
    case, statuses = CASES[name]
    resp = case(stack, owned)
    assert resp.status_code in statuses, resp.text
    text = resp.text
    assert SECRET not in text
    if resp.status_code == 200:  # an error may echo the id the caller sent, data may not
        assert owned["job"]["id"] not in text
        assert owned["job"]["call_id"] not in text or name.startswith(("call read", "calls"))
    if resp.status_code == 200 and name.startswith("call read"):
        assert resp.json() == {"call": None}
    if name == "calls stream, own project by call id":
        assert resp.text == ""
    if name == "usage":
        assert resp.json()["totals"]["jobs"] == 0


def test_owner_still_sees_everything(stack: Stack, owned: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {owned['key']}"}
    job = httpx.get(f"{stack.base_url}/v1/images/jobs/{owned['job']['id']}", headers=headers)
    assert job.json()["request"]["prompt"] == SECRET
    url = job.json()["result"]["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert f"/{owned['job']['id']}/" in url  # objects are namespaced by project and job
    call = httpx.post(
        f"{stack.base_url}/call/read",
        headers=_basic(owned["key"]),
        json={"project_id": "owner", "id": owned["job"]["call_id"]},
    ).json()
    assert call["call"]["inputs"]["prompt"] == SECRET
    usage = httpx.get(f"{stack.base_url}/v1/usage", headers=headers).json()
    assert usage["totals"]["jobs"] >= 1
