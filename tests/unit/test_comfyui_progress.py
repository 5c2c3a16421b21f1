"""The ``comfyui`` provider's progress: ComfyUI's websocket messages parsed (text
frames only, its ``{"type", "data"}``), the first ``progress`` of one of the call's
prompts taken and the rest skipped (previews, other clients' prompts, nonsense
numbers), a prompt not running told within HINT_SECONDS, a prompt's steps as the
call's; and against the fake server over a real socket: each look at a running
prompt answers its sampler's step, a queued one none, a server without the socket
none and no error, a proxy's key sent on the handshake."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from shared.jobs.schemas import GenerationParams
from shared.providers import comfyui
from shared.providers.base import Call, Generation, Pending
from shared.providers.comfyui import (
    ComfyUIProvider,
    call_progress,
    parse_message,
    read_progress,
)
from shared.registry import UpstreamModel
from tests.support.fakes.comfyui import INPUTS, WORKFLOW_FILE, FakeComfyUI

NO_N = {k: v for k, v in INPUTS.items() if k != "n"}
OURS, THEIRS = "prompt-ours", "prompt-theirs"


@pytest.fixture
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


@pytest.fixture
def provider() -> Iterator[ComfyUIProvider]:
    with httpx.Client(timeout=5) as client:
        yield ComfyUIProvider(client)


def _spec(base_url: str, **fields: Any) -> UpstreamModel:
    entry = {
        "name": "comfy",
        "provider": "comfyui",
        "base_url": base_url,
        "workflow": str(WORKFLOW_FILE),
        "workflow_inputs": INPUTS,
        "poll_seconds": 0.01,
        "capabilities": {"sizes": ["64x64"], "max_n": 4, "seed": True},
        **fields,
    }
    return UpstreamModel.model_validate(entry)


def _call(spec: UpstreamModel, count: int = 1, prompt: str = "a red fox") -> Call:
    params = GenerationParams(model="comfy", prompt=prompt, n=count, size="64x64")
    return Call(spec, params, count)


def _message(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


def _socket(*messages: str | bytes) -> Any:
    """``recv(timeout)`` over ``messages``, then a timeout after waiting it out."""
    queue = list(messages)

    def recv(timeout: float) -> str | bytes:
        if queue:
            return queue.pop(0)
        time.sleep(timeout)
        raise TimeoutError

    return recv


# --- the messages ----------------------------------------------------------------------


def test_a_message_is_comfyuis_type_and_data_from_a_text_frame() -> None:
    assert parse_message(_message("progress", value=3, max=20)) == (
        "progress",
        {"value": 3, "max": 20},
    )
    assert parse_message(b"\x00\x00\x00\x01\x00\x00\x00\x01jpeg") is None  # a preview
    assert parse_message("not json") is None
    assert parse_message(json.dumps([1, 2])) is None
    assert parse_message(json.dumps({"type": "status", "data": None})) is None


def test_the_first_progress_of_the_calls_prompt_is_taken_the_rest_skipped() -> None:
    recv = _socket(
        _message("status", status={"exec_info": {"queue_remaining": 2}}, sid="c"),
        _message("executing", node="3"),  # the reconnect hint: ours runs
        b"\x00\x00\x00\x01\x00\x00\x00\x01jpeg",
        _message("progress", value=9, max=20, prompt_id=THEIRS, node="3"),  # broadcast
        _message("progress", value=True, max=20, prompt_id=OURS, node="3"),
        _message("progress", value=30, max=20, prompt_id=OURS, node="3"),
        _message("progress", value=4, max=20, prompt_id=OURS, node="3"),
        _message("progress", value=5, max=20, prompt_id=OURS, node="3"),
    )
    assert read_progress(recv, [OURS], time.monotonic() + 5) == (OURS, 4, 20)


def test_a_prompt_not_running_is_told_at_once_not_at_the_deadline() -> None:
    recv = _socket(_message("status", status={"exec_info": {"queue_remaining": 3}}, sid="c"))
    started = time.monotonic()
    assert read_progress(recv, [OURS], started + 5) is None
    assert time.monotonic() - started < comfyui.HINT_SECONDS + 0.3


def test_a_prompt_that_ended_has_no_progress_to_wait_for() -> None:
    for end in (
        _message("execution_success", prompt_id=OURS),
        _message("executing", node=None, prompt_id=OURS),
    ):
        recv = _socket(_message("status", sid="c"), _message("executing", node="3"), end)
        started = time.monotonic()
        assert read_progress(recv, [OURS], started + 5) is None
        assert time.monotonic() - started < 0.5


def test_a_running_prompt_is_listened_to_until_the_deadline_only() -> None:
    recv = _socket(_message("status", sid="c"), _message("executing", node="3"))
    started = time.monotonic()
    assert read_progress(recv, [OURS], started + 0.4) is None
    assert 0.35 < time.monotonic() - started < 0.8


def test_a_prompts_steps_count_as_the_calls_after_those_before_it() -> None:
    assert call_progress(["a"], "a", 7, 20) == (7, 20)
    assert call_progress(["a", "b", "c"], "b", 5, 20) == (25, 60)


# --- against the fake server -----------------------------------------------------------


def test_each_look_at_a_running_prompt_answers_its_samplers_step(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    call = _call(_spec(fake.base_url), count=2)
    ref = provider.submit(call)
    first, second = provider.poll(call, ref), provider.poll(call, ref)
    assert isinstance(first, Pending)
    assert isinstance(second, Pending)
    assert (first.progress, second.progress) == ((1, 20), (2, 20))
    assert isinstance(provider.poll(call, ref), Generation)
    assert [client for client, _ in fake.sockets] == [ref["client_id"]] * 2


def test_waiting_in_place_reports_each_step_to_the_calls_progress(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    steps: list[tuple[int, int]] = []
    call = replace(_call(_spec(fake.base_url)), progress=lambda s, t: steps.append((s, t)))
    assert len(provider.generate(call).images) == 1
    assert steps == [(1, 20), (2, 20)]


def test_a_prompt_per_image_counts_those_run_before_it(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.inputs = NO_N
    call = _call(_spec(fake.base_url, workflow_inputs=NO_N), count=2)
    ref = provider.submit(call)
    seen = []
    while not isinstance(answer := provider.poll(call, ref), Generation):
        seen.append(answer.progress)
    assert seen == [(1, 40), (2, 40), (21, 40), (22, 40)]


def test_a_prompt_queued_behind_another_has_no_progress_and_costs_little(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.pending_polls = 1000
    spec = _spec(fake.base_url)
    provider.submit(_call(spec, prompt="ahead"))
    call = _call(spec, prompt="behind")
    ref = provider.submit(call)
    started = time.monotonic()
    answer = provider.poll(call, ref)
    assert isinstance(answer, Pending)
    assert answer.progress is None
    assert time.monotonic() - started < comfyui.HINT_SECONDS + 0.4


def test_a_server_without_the_socket_is_looked_at_without_progress(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.ws_refused = True  # a proxy that passes no websocket
    call = _call(_spec(fake.base_url))
    ref = provider.submit(call)
    answer = provider.poll(call, ref)
    assert isinstance(answer, Pending)
    assert answer.progress is None
    assert len(_until_done(provider, call, ref).images) == 1


def test_a_proxys_key_goes_with_the_handshake_to_the_server_only(
    provider: ComfyUIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeComfyUI(api_key="proxy-secret").start()
    try:
        monkeypatch.setenv("COMFY_PROXY_KEY", "proxy-secret")
        call = _call(_spec(fake.base_url, api_key_env="COMFY_PROXY_KEY"))
        ref = provider.submit(call)
        answer = provider.poll(call, ref)
        assert isinstance(answer, Pending)
        assert answer.progress == (1, 20)
        assert fake.sockets == [(ref["client_id"], "Bearer proxy-secret")]
    finally:
        fake.stop()


def test_a_recorded_client_id_that_is_not_ours_is_never_put_in_a_url(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    call = _call(_spec(fake.base_url))
    ref = provider.submit(call)
    answer = provider.poll(call, {**ref, "client_id": "x&clientId=other"})
    assert isinstance(answer, Pending)
    assert answer.progress is None
    assert fake.sockets == []
    assert comfyui._ws_url(_spec("https://comfy.test/box"), ref["client_id"]) == (
        f"wss://comfy.test/box/ws?clientId={ref['client_id']}"
    )


def _until_done(provider: ComfyUIProvider, call: Call, ref: dict[str, Any]) -> Generation:
    for _ in range(20):
        answer = provider.poll(call, ref)
        if isinstance(answer, Generation):
            return answer
    raise AssertionError("never done")
