"""One GPU consumer per device (issue 30): `imagegen worker --queues gpu --devices
all` starts a consumer of the local models' queues for each GPU of the host, each
pinned by IMAGEGEN_DEVICE in its environment, and a restart keeps the pin."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from shared.core.settings import Settings
from worker import supervisor
from worker.supervisor import (
    Consumer,
    WorkerGroup,
    consumers,
    gpu_count,
    resolve_devices,
)

SETTINGS = Settings(broker_url="redis://localhost:6379/0", gpu_worker_slots=16)


@pytest.fixture
def no_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host without the NVIDIA driver's listing or nvidia-smi."""
    monkeypatch.setattr(supervisor, "NVIDIA_GPUS", tmp_path / "no-driver")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_devices_all_counts_the_gpus_cuda_lets_the_worker_see(
    monkeypatch: pytest.MonkeyPatch, no_driver: None
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resolve_devices("all") == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3c9e,GPU-77aa,-1,2")  # stops at -1
    assert resolve_devices("all") == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_devices("all") == []


def test_without_cuda_visible_devices_the_driver_listing_or_nvidia_smi_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_driver: None
) -> None:
    assert gpu_count({}) == 0
    smi = tmp_path / "nvidia-smi"
    lines = ["GPU 0: NVIDIA H100 (UUID: GPU-1)", "GPU 1: NVIDIA H100 (UUID: GPU-2)"]
    smi.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    smi.chmod(0o755)
    assert gpu_count({}) == 2
    listing = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (listing / bus).mkdir(parents=True)
    monkeypatch.setattr(supervisor, "NVIDIA_GPUS", listing)
    assert gpu_count({}) == 3


def test_named_devices_are_taken_as_named_and_a_bad_one_refused() -> None:
    assert resolve_devices("cuda:0, cuda:2,cuda:0") == ["cuda:0", "cuda:2"]
    with pytest.raises(ValueError, match="gpu7"):
        resolve_devices("cuda:0,gpu7")


def test_each_device_gets_a_gpu_consumer_pinned_to_it_and_one_sweeper() -> None:
    made = consumers(
        SETTINGS, ["default", "gpu"], None, True, {"gpu"}, devices=["cuda:0", "cuda:1"]
    )
    assert made == [
        Consumer(["--queues", "default"]),
        Consumer(
            ["--queues", "gpu", "--concurrency", "16", "--no-sweeper"],
            {"IMAGEGEN_DEVICE": "cuda:0"},
        ),
        Consumer(
            ["--queues", "gpu", "--concurrency", "16", "--no-sweeper"],
            {"IMAGEGEN_DEVICE": "cuda:1"},
        ),
    ]
    gpu_only = consumers(SETTINGS, ["gpu"], None, True, {"gpu"}, devices=["cuda:0", "cuda:1"])
    assert [c.args for c in gpu_only] == [
        ["--queues", "gpu", "--concurrency", "16"],  # the worker's sweeper
        ["--queues", "gpu", "--concurrency", "16", "--no-sweeper"],
    ]


def test_no_gpu_found_gives_one_consumer_not_pinned(no_driver: None) -> None:
    made = consumers(SETTINGS, ["gpu"], None, True, {"gpu"}, devices=resolve_devices("all"))
    assert made == [Consumer(["--queues", "gpu", "--concurrency", "16"])]


class Child:
    """A started consumer that exits when told (no process)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.exit = threading.Event()
        self.pid = 4242

    def wait(self, timeout: float | None = None) -> int:
        self.exit.wait(timeout)
        return 1

    def poll(self) -> int | None:
        return 1 if self.exit.is_set() else None

    def send_signal(self, _signum: int) -> None:
        self.exit.set()


def test_a_pinned_consumer_started_again_keeps_its_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    started: list[Child] = []
    again = threading.Event()

    def popen(args: list[str], env: dict[str, str], **_: Any) -> Child:
        started.append(Child(env))
        if len(started) == 4:
            again.set()
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(supervisor, "FIRST_RESTART_DELAY", 0.01)
    group = WorkerGroup(SETTINGS, ["gpu"], local_queues={"gpu"}, devices=resolve_devices("all"))
    assert [c.env["IMAGEGEN_DEVICE"] for c in started] == ["cuda:0", "cuda:1"]
    started[1].exit.set()  # cuda:1's consumer dies
    started[0].exit.set()  # then cuda:0's
    assert again.wait(5)
    assert sorted(c.env["IMAGEGEN_DEVICE"] for c in started[2:]) == ["cuda:0", "cuda:1"]
    assert [c.restarts for c in group.children] == [1, 1]
    group.stop(timeout=1)
