"""A GPU consumer's room (worker/gpu/, issue 30) in-process, on a tiny pipeline the
test builds (CPU): jobs that share a plan share a pipeline call, each keeping its
seeds, its cancel and its failure; projects and interactive jobs take turns."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy
import pytest
import sqlalchemy as sa
import torch
from PIL import Image as Picture
from sqlmodel import col

from shared.batches.pump import pump
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.jobs.models import Image, Job
from shared.jobs.service import job_prefix
from shared.providers.local import pipelines
from tests.service.conftest import TINY_LOCAL, Service
from tests.support.tiny_diffusion import build_tiny_sd
from worker.gpu import room as room_module
from worker.gpu.consumer import record_handed, run_local
from worker.gpu.room import Room, Ticket
from worker.gpu.turns import Waiting
from worker.leases import LEASES


class Recording:
    """The loaded pipeline, each call's prompts recorded (in order); a call for
    more than ``limit`` images runs out of GPU memory as torch raises it (the
    condition a CPU cannot produce); ``at_step`` runs before each step's own
    callback."""

    def __init__(self, pipe: Any, device: Device) -> None:
        self.pipe, self.device = pipe, device

    def __call__(self, **kw: Any) -> Any:
        self.device.calls.append(list(kw["prompt"]))
        if len(kw["prompt"]) > self.device.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        self.device.started.set()
        inner, hook = kw["callback_on_step_end"], self.device.at_step

        def on_step(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> Any:
            if hook is not None:
                hook(step)
            return inner(pipe, step, t, tensors)

        return self.pipe(**{**kw, "callback_on_step_end": on_step})

    def __getattr__(self, name: str) -> Any:  # the rest of the pipeline, as it is
        return getattr(self.pipe, name)


class Device:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.limit = 64
        self.started = threading.Event()
        self.at_step: Callable[[int], None] | None = None


@pytest.fixture(scope="module")
def tiny(service: Service) -> Path:
    return build_tiny_sd(get_settings().data_dir / TINY_LOCAL)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch, tiny: Path) -> Device:
    seen = Device()
    loaded = pipelines.using

    @contextmanager
    def recording(spec: Any, task: Any = "text2image") -> Iterator[Any]:
        with loaded(spec, task) as (pipe, where):
            yield Recording(pipe, seen), where

    monkeypatch.setattr(pipelines, "using", recording)
    return seen


def submit(service: Service, prompt: str, key: str | None = None, **body: Any) -> str:
    with service.client(key) as client:
        resp = client.post(
            "/v1/images/generations",
            json={"model": TINY_LOCAL, "prompt": prompt, "size": "64x64", **body},
            headers={"Prefer": "respond-async"},
        )
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def images(job_id: str) -> list[bytes]:
    with unit_of_work() as session:
        keys = session.execute(
            sa.select(col(Image.storage_key))
            .where(col(Image.job_id) == job_id)
            .order_by(col(Image.index))
        ).scalars()
        return [get_storage().get(key) for key in keys]


def pixels(data: bytes) -> Any:
    return numpy.asarray(Picture.open(io.BytesIO(data)), dtype=numpy.int16)


def test_jobs_that_share_a_plan_share_one_call_each_with_its_images(
    service: Service, device: Device
) -> None:
    with service.paused():
        jobs = [submit(service, f"share {i}", seed=100 + i, n=1 + i % 2) for i in range(3)]
        other_size = submit(service, "another plan", seed=5, size="32x32")
        ended = run_local([*jobs, other_size])
    assert ended == dict.fromkeys([*jobs, other_size], "succeeded")
    # 1 + 2 + 1 images in one call; the job of another size in a call of its own.
    assert device.calls == [["share 0", "share 1", "share 1", "share 2"], ["another plan"]]
    assert [len(images(job)) for job in jobs] == [1, 2, 1]
    assert Picture.open(io.BytesIO(images(other_size)[0])).size == (32, 32)


def test_an_image_is_its_seeds_batched_or_alone(service: Service, device: Device) -> None:
    prompts = [("a red fox", 300), ("a blue jay", 301), ("a red fox", 302)]
    with service.paused():
        batched = [submit(service, p, seed=s) for p, s in prompts]
        run_local(batched)
        alone = [submit(service, p, seed=s) for p, s in prompts]
        for job in alone:
            run_local([job])
        again = [submit(service, p, seed=s) for p, s in prompts]
        run_local(again)
    assert [len(call) for call in device.calls] == [3, 1, 1, 1, 3]
    made = [images(job)[0] for job in batched]
    # The same call with the same companions: the same bytes.
    assert [images(job)[0] for job in again] == made
    # Made alone, each image starts from its own seed's noise and is the same
    # picture; a matrix product's rounding depends on how many rows it has, so a
    # pixel may differ by one level (shared/providers/local/diffusion.py).
    for job, want in zip(alone, made, strict=True):
        got = pixels(images(job)[0])
        assert numpy.abs(got - pixels(want)).max() <= 1
        assert (got == pixels(want)).mean() > 0.99
    # Same prompt, another seed: another picture.
    assert numpy.abs(pixels(made[0]) - pixels(made[2])).max() > 20


def test_a_cancel_inside_a_shared_call_ends_only_that_job(service: Service, device: Device) -> None:
    with service.paused():
        jobs = [submit(service, f"long {i}", seed=i) for i in range(3)]

        def cancel_the_second(step: int) -> None:
            """Before the second step, the second job is canceled through the API;
            before the third, the step waits until the worker noticed: its next
            progress write (noted at the second step, so after the cancel) refused."""
            if step == 1:
                with service.client() as client:
                    assert client.post(f"/v1/images/jobs/{jobs[1]}/cancel").status_code == 200
            if step == 2:
                deadline = time.monotonic() + 30  # the writer's interval, on a busy machine
                while not LEASES.lost(jobs[1]) and time.monotonic() < deadline:
                    time.sleep(0.02)

        device.at_step = cancel_the_second
        ended = run_local(jobs)
    assert ended == {jobs[0]: "succeeded", jobs[1]: "discarded", jobs[2]: "succeeded"}
    assert len(device.calls) == 1  # the call went on for the others
    with unit_of_work() as session:
        canceled = session.get(Job, jobs[1])
    assert canceled is not None
    assert canceled.status == "canceled"
    assert [len(images(job)) for job in jobs] == [1, 0, 1]
    # Dropped from the call when its cancel was noticed: no image of it was made,
    # so none was stored (one made to the end would be, then its end discarded).
    assert list(get_storage().scan(job_prefix(canceled.project_id, canceled.id))) == []


def test_out_of_memory_splits_a_shared_call_until_it_fits(service: Service, device: Device) -> None:
    device.limit = 1
    with service.paused():
        jobs = [submit(service, f"big {i}", seed=i) for i in range(3)]
        ended = run_local(jobs)
    assert ended == dict.fromkeys(jobs, "succeeded")
    # 3 images: out of memory; 1, then 2: out of memory; 1 and 1.
    assert [len(call) for call in device.calls] == [3, 1, 2, 1, 1]


def test_one_image_that_does_not_fit_fails_its_job_alone(service: Service, device: Device) -> None:
    device.limit = 0
    with service.paused():
        job = submit(service, "too big", seed=1)
        ended = run_local([job])
    assert ended == {job: "failed"}
    with service.client() as client:
        error = client.get(f"/v1/images/jobs/{job}").json()["error"]
    assert error["code"] == "out_of_memory"


@pytest.fixture
def batch_project(service: Service) -> str:
    return service.create_key(f"gpu-batch-{time.monotonic_ns()}")


def _batch_lines(service: Service, key: str, lines: int, prompt: str) -> list[str]:
    with service.client(key) as client:
        resp = client.post(
            "/v1/images/batches",
            json={
                "model": TINY_LOCAL,
                "size": "64x64",
                "prompts": [f"{prompt} {i}" for i in range(lines)],
            },
        )
    assert resp.status_code == 200, resp.text
    with unit_of_work() as session:
        assert pump(session, resp.json()["id"]).started == lines
    with unit_of_work() as session:
        ids = session.execute(
            sa.select(col(Job.id))
            .where(col(Job.batch_id) == resp.json()["id"])
            .order_by(col(Job.id))
        ).scalars()
        return list(ids)


def test_a_batch_of_fifty_holds_another_projects_request_back_two_calls_at_most(
    service: Service, device: Device, batch_project: str
) -> None:
    """Project A's batch of 50 lines runs on the device, in chunks of 16 as the pump
    sends them; project B's single request arrives meanwhile: it is in the next
    call or the one after (the call under way when it arrived, then its own)."""
    with service.paused():
        lines = _batch_lines(service, batch_project, 50, "line")
        with unit_of_work() as session:  # a GPU queue: the lines run there, not on `batch`
            queues = set(session.execute(sa.select(col(Job.queue)).where(col(Job.id).in_(lines))))
        assert queues == {("gpu",)}
        chunks = [lines[i : i + 16] for i in range(0, 50, 16)]
        outcomes: dict[str, str] = {}
        threads = [
            threading.Thread(target=lambda c=c: outcomes.update(run_local(c))) for c in chunks
        ]
        for thread in threads:
            thread.start()
        assert device.started.wait(30)
        arrived = len(device.calls)
        single = submit(service, "project b", service.key_a, seed=9)
        assert run_local([single]) == {single: "succeeded"}
        for thread in threads:
            thread.join(60)
    assert outcomes == dict.fromkeys(lines, "succeeded")
    served = next(i for i, call in enumerate(device.calls) if "project b" in call)
    assert served - arrived <= 1, device.calls
    assert len(device.calls[served]) == 4  # A's lines fill B's call
    assert sum(len(call) for call in device.calls) == 51


def test_queue_positions_follow_the_devices_turns(service: Service, batch_project: str) -> None:
    """Interactive jobs first; then projects' batch lines, one each a turn."""
    other = service.create_key(f"gpu-other-{time.monotonic_ns()}")
    with service.paused():
        a = _batch_lines(service, batch_project, 3, "a")
        c = _batch_lines(service, other, 2, "c")
        b = [submit(service, f"b {i}", seed=i) for i in range(2)]
        with service.client() as client:
            positions = {
                job: client.get(f"/v1/images/jobs/{job}").json()["queue_position"] for job in b
            }
        for key, jobs in ((batch_project, a), (other, c)):
            with service.client(key) as client:
                positions.update(
                    {
                        job: client.get(f"/v1/images/jobs/{job}").json()["queue_position"]
                        for job in jobs
                    }
                )
        ordered = sorted(positions, key=positions.__getitem__)
        run_local([*a, *c, *b])  # leave nothing queued for the next test
    assert ordered == [b[0], b[1], a[0], c[0], a[1], c[1], a[2]]
    assert sorted(positions.values()) == list(range(1, 8))


def edit(service: Service, prompt: str) -> str:
    picture = io.BytesIO()
    Picture.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
    with service.client() as client:
        resp = client.post(
            "/v1/images/edits",
            files={"image": ("in.png", picture.getvalue(), "image/png")},
            data={"model": TINY_LOCAL, "prompt": prompt, "size": "64x64"},
            headers={"Prefer": "respond-async"},
        )
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def test_an_edit_whose_input_cannot_be_read_fails_alone(service: Service, device: Device) -> None:
    with service.paused():
        good, bad = edit(service, "good edit"), edit(service, "bad edit")
        with unit_of_work() as session:
            key = session.get(Job, bad).request["images"][0]  # type: ignore[union-attr]
        get_storage().put(key, b"not a picture", "image/png")
        ended = run_local([good, bad])
    assert ended == {good: "succeeded", bad: "failed"}
    assert device.calls == [["good edit"]]


def test_a_job_that_waited_too_long_goes_back_to_the_broker_keeping_its_turn(
    service: Service, tiny: Path
) -> None:
    """Past half of redeliver_after_seconds a waiting job that the next call does
    not take is published again and its message answered: no message stays
    unacked for a broker to take it back. The next call is chosen first, over
    every waiting job, so a job whose turn it is is served, however long it waited
    (a call longer than the limit hands jobs back, never starves them)."""
    with service.paused():
        first = submit(service, "first", seed=1)
        other = submit(service, "another size", seed=2, size="32x32")
        with unit_of_work() as session:
            before = session.get(Job, other).published_at  # type: ignore[union-attr]
        room = Room("test-device")
        arrivals = [
            Ticket(Waiting(first, "p", True, "64", 1, 4), 0.0, "gpu", False),
            Ticket(Waiting(other, "p", True, "32", 1, 4), 0.0, "gpu", False),
        ]
        for ticket in arrivals:  # both waited past the limit
            ticket.entered -= get_settings().redeliver_after_seconds
        served, handed_back = (t.handed.result(30) for t in room.enter(arrivals))
        assert handed_back.job is None
        assert served.job is not None
        assert record_handed(served) == "succeeded"
        with unit_of_work() as session:
            row = session.get(Job, other)
            assert row is not None
            assert (row.status, row.lease_token) == ("queued", None)
            assert row.published_at is not None
            assert before is not None
            assert row.published_at > before
        run_local([other])  # leave nothing queued for the next test


def test_a_warm_shutdown_hands_every_waiting_job_back(service: Service, tiny: Path) -> None:
    with service.paused():
        jobs = [submit(service, f"shutdown {i}", seed=i) for i in range(2)]
        room = Room("closing-device")
        room.close()
        tickets = room.enter(
            [Ticket(Waiting(j, "p", True, "plan", 1, 4), 0.0, "gpu", False) for j in jobs]
        )
        assert [t.handed.result(10).job for t in tickets] == [None, None]
        run_local(jobs)


def test_a_call_that_fails_before_it_starts_answers_every_job_and_holds_no_lease(
    service: Service, monkeypatch: pytest.MonkeyPatch, device: Device
) -> None:
    """The jobs were claimed (their leases held), then the call could not be made:
    every job's thread is answered and every lease let go, so the sweeper takes
    the jobs back once their leases expire instead of a heartbeat renewing them."""

    def broken(_job: Job) -> Any:
        raise RuntimeError("a bug between the claim and the call")

    with service.paused():
        jobs = [submit(service, f"no call {i}", seed=i) for i in range(3)]
        with monkeypatch.context() as patch:
            patch.setattr(room_module, "StepReporter", broken)
            with pytest.raises(RuntimeError):
                run_local(jobs)
        assert not any(LEASES.holds(job) for job in jobs)
        with unit_of_work() as session:
            assert {session.get(Job, job).status for job in jobs} == {"running"}  # type: ignore[union-attr]
            session.execute(  # their leases run out, as nothing renews them
                sa.update(Job)
                .where(col(Job.id).in_(jobs))
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        assert run_local(jobs) == dict.fromkeys(jobs, "succeeded")  # taken over
    assert len(device.calls) == 1
