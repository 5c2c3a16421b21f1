"""A worker reads a provider's answer only once its job holds one of the process's
answer slots, and keeps it until the job leaves (shared/providers/answers.py): when
thousands of calls return together, memory is bounded by the slots."""

from __future__ import annotations

import base64
import contextvars
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx

from shared.jobs.schemas import GenerationParams
from shared.providers.answers import answer_slot, before_answer
from shared.providers.base import Call, Generation
from shared.providers.openai_compat import OpenAICompatibleProvider
from shared.registry import Capabilities, UpstreamModel

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
SPEC = UpstreamModel(
    name="m",
    provider="openai",
    base_url="http://upstream.test/v1",
    capabilities=Capabilities(sizes=["64x64"], max_n=4),
)
PARAMS = GenerationParams(model="m", prompt="p", n=1, size="64x64")


class WatchedBody(httpx.SyncByteStream):
    """An answer's body that notes when someone starts reading it."""

    def __init__(self, reads: list[str], name: str) -> None:
        self.reads = reads
        self.name = name

    def __iter__(self) -> Iterator[bytes]:
        self.reads.append(self.name)
        yield json.dumps({"data": [{"b64_json": base64.b64encode(PNG).decode()}]}).encode()


def provider(reads: list[str]) -> OpenAICompatibleProvider:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=WatchedBody(reads, json.loads(request.content)["prompt"]))

    return OpenAICompatibleProvider(httpx.Client(transport=httpx.MockTransport(answer)))


def job(slots: threading.Semaphore, upstream: OpenAICompatibleProvider, prompt: str) -> Generation:
    params = PARAMS.model_copy(update={"prompt": prompt})
    with answer_slot(slots):
        return upstream.generate(Call(SPEC, params, 1, 0))


def test_an_answer_waits_unread_until_its_job_holds_a_slot() -> None:
    slots = threading.Semaphore(1)
    reads: list[str] = []
    upstream = provider(reads)
    with ThreadPoolExecutor(1) as pool, answer_slot(slots):
        before_answer()  # this job holds the only slot
        waiting = pool.submit(job, slots, upstream, "second")
        threading.Event().wait(0.3)
        assert reads == []  # the answer arrived; its body is not read
        assert not waiting.done()
    # The first job left: the second takes the slot and reads its answer.
    assert waiting.result(timeout=10).images[0].data == PNG
    assert reads == ["second"]
    assert slots.acquire(blocking=False)  # and gave it back when it left


def test_a_jobs_fanned_out_calls_share_its_one_slot() -> None:
    slots = threading.Semaphore(2)
    reads: list[str] = []
    upstream = provider(reads)
    with ThreadPoolExecutor(4) as pool, answer_slot(slots):
        futures = [
            pool.submit(contextvars.copy_context().run, upstream.generate, Call(SPEC, PARAMS, 1, i))
            for i in range(4)
        ]
        assert all(len(f.result(timeout=10).images) == 1 for f in futures)
        assert len(reads) == 4
        assert slots.acquire(blocking=False)  # one of two slots taken, for all four
        assert not slots.acquire(blocking=False)
        slots.release()
    assert [slots.acquire(blocking=False) for _ in range(2)] == [True, True]


def test_outside_a_job_a_provider_takes_no_slot() -> None:
    reads: list[str] = []
    assert provider(reads).generate(Call(SPEC, PARAMS, 1, 0)).images[0].data == PNG
    assert reads == ["p"]
