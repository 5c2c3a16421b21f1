"""``imagegen worker``: a small supervising process and its consumer children.

The process a user (or compose, or systemd) starts does no work itself: it starts
the consumers (``python -m worker ...``) and starts each again whenever it dies,
for whatever reason (a crash, an out-of-memory kill, an unrecoverable error in a
library). With no consumer nothing runs and accepted jobs only wait; SQL leases
hand over whatever a dead consumer held, so a restart loses nothing.

It imports no Celery, SQLAlchemy or provider code (nor torch: it counts GPUs
without it): it stays small and cannot be brought down by what brings a consumer
down.

On a host with several GPUs (``--devices all``), the queues of local models get one
consumer per device, each pinned to its device by ``IMAGEGEN_DEVICE`` in its
environment, kept across its restarts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from shared.core.logs import configure
from shared.core.settings import Settings

log = logging.getLogger(__name__)

PARENT_ENV = "IMAGEGEN_WORKER_PARENT_PID"
# A consumer that dies sooner than this after its start is started again after a
# growing pause (a configuration error would otherwise spin a CPU).
HEALTHY_AFTER_SECONDS = 10.0
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
# Where the NVIDIA driver lists a host's GPUs, one folder each (no torch needed).
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Consumer:
    """One consumer process to run: its arguments, and what its environment adds
    (``IMAGEGEN_DEVICE`` for a GPU consumer pinned to its device)."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def consumer_args(
    settings: Settings,
    queues: list[str],
    concurrency: int | None,
    sweeper: bool,
    local_queues: Collection[str] = (),
) -> list[list[str]]:
    """The consumer processes that serve ``queues``: one, or two when the batch queue
    is among others (its own lower-priority process: inside one Python process a big
    batch took most of the interpreter from sync jobs, p50 44 -> 440 ms measured).

    Queues of local models (``local_queues``) get a consumer of their own, holding
    ``gpu_worker_slots`` jobs at once: the jobs it picks each pipeline call's
    companions and the next turn from (issue 30; the pipeline still runs one call at
    a time per device). It alone imports torch."""
    extra = ["--concurrency", str(concurrency)] if concurrency else []
    gpu = [q for q in queues if q in local_queues]
    queues = [q for q in queues if q not in local_queues]
    slots = str(settings.gpu_worker_slots)
    if not queues:
        return [["--queues", ",".join(gpu), "--concurrency", slots, *_sweeps(sweeper)]]
    children = [["--queues", ",".join(gpu), "--concurrency", slots, "--no-sweeper"]] if gpu else []
    main = [*extra, *_sweeps(sweeper)]
    split = (
        settings.worker_split_batch
        and settings.batch_queue in queues
        and len(queues) > 1
        and not settings.embedded_broker
    )
    if not split:
        return [["--queues", ",".join(queues), *main], *children]
    rest = [q for q in queues if q != settings.batch_queue]
    return [
        ["--queues", ",".join(rest), *main],
        ["--queues", settings.batch_queue, *extra, "--no-sweeper"],
        *children,
    ]


def consumers(
    settings: Settings,
    queues: list[str],
    concurrency: int | None,
    sweeper: bool,
    local_queues: Collection[str] = (),
    devices: Sequence[str] = (),
) -> list[Consumer]:
    """``consumer_args``' processes, the consumer of local models' queues once per
    device of ``devices`` (none: once, unpinned), each pinned to its device. Only
    the first of them sweeps (one sweeper a worker is enough; each is safe)."""
    local = set(local_queues)
    made: list[Consumer] = []
    for args in consumer_args(settings, queues, concurrency, sweeper, local_queues):
        serves = set(args[args.index("--queues") + 1].split(","))
        if not devices or not serves <= local:
            made.append(Consumer(args))
            continue
        for i, device in enumerate(devices):
            own = args if i == 0 or "--no-sweeper" in args else [*args, "--no-sweeper"]
            made.append(Consumer(own, {"IMAGEGEN_DEVICE": device}))
    return made


def resolve_devices(text: str) -> list[str]:
    """``--devices``: ``all`` (every GPU this host shows: ``cuda:0`` ...), or the
    devices named, comma-separated (``cuda:0,cuda:2``). An empty list: no GPU
    found, one consumer unpinned. A name that is no device raises ValueError."""
    if text.strip() != "all":
        named = [d.strip() for d in text.split(",") if d.strip()]
        bad = [d for d in named if not DEVICE.match(d)]
        if bad or not named:
            raise ValueError(f"not a device: {', '.join(bad) or text!r} (cuda:0, cuda:1, ...)")
        return list(dict.fromkeys(named))  # each once: two consumers would share one GPU
    count = gpu_count(os.environ)
    if not count:
        log.warning("--devices all: no GPU found; one consumer, not pinned to a device")
    return [f"cuda:{i}" for i in range(count)]


def gpu_count(environ: Mapping[str, str]) -> int:
    """How many GPUs this host lets its processes see, without importing torch:
    CUDA_VISIBLE_DEVICES where set (its entries; CUDA numbers them from 0), else the
    driver's /proc listing, else ``nvidia-smi -L``; 0 if none says."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",")]
        # CUDA stops at the first entry that names no device ("-1" hides them all).
        count = 0
        for entry in entries:
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    if NVIDIA_GPUS.is_dir():
        return sum(1 for _ in NVIDIA_GPUS.iterdir())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed: %s", exc)
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def node_name(queues: Sequence[str], pid: int) -> str:
    """This consumer's Celery node name, ``<queues>.<pid>@%h``: one of its own per
    process and host. Celery's default, ``celery@<host>``, is the same for every
    consumer on a host, and on RabbitMQ each node's remote-control queue
    (``<node>.celery.pidbox``) is exclusive to one connection: the second consumer of
    an ``imagegen worker`` died at start with ResourceLocked, and again on every
    restart (issue 28). The pid, not an index, so that a consumer started again while
    the broker still holds its dead predecessor's connection gets a new name too."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(queues))[:64]  # "@" would split it
    return f"{label}.{pid}@%h"


def _sweeps(sweeper: bool) -> list[str]:
    return [] if sweeper else ["--no-sweeper"]


class ChildWorker:
    """One consumer, ``python -m worker ARGS``, started again whenever it dies."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "worker", *args]
        # Should this process die without stopping it, the child shuts itself down.
        # ``env`` (its device) is kept for every start: a restart keeps its pin.
        self.pinned = dict(env or {})
        self.env = {**os.environ, **self.pinned, PARENT_ENV: str(os.getpid())}
        self._stopping = threading.Event()
        self.restarts = 0
        self.proc = self._start()
        threading.Thread(target=self._watch, name="worker-supervisor", daemon=True).start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.started = time.monotonic()
        # A session of its own: Ctrl-C in a terminal reaches only the supervisor,
        # which stops each consumer with one SIGTERM (a second signal on top of the
        # terminal's SIGINT would turn Celery's warm shutdown into a cold one).
        return subprocess.Popen(self.args, env=self.env, start_new_session=True)

    def _watch(self) -> None:
        delay = FIRST_RESTART_DELAY
        while True:
            code = self.proc.wait()
            lived = time.monotonic() - self.started
            delay = (
                FIRST_RESTART_DELAY
                if lived >= HEALTHY_AFTER_SECONDS
                else min(delay * 2, MAX_RESTART_DELAY)
            )
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            log.warning(
                "worker %s exited (%s) after %.0fs; starting it again",
                " ".join(self.args[3:]),
                code,
                lived,
            )
            self.proc = self._start()

    def stop(self, timeout: float = 60) -> None:
        """A warm shutdown: the child finishes the jobs it holds, within ``timeout``."""
        self._stopping.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class WorkerGroup:
    """The consumers of one ``imagegen worker`` (or of ``imagegen dev``)."""

    def __init__(
        self,
        settings: Settings,
        queues: list[str],
        concurrency: int | None = None,
        sweeper: bool = True,
        local_queues: Collection[str] = (),
        devices: Sequence[str] = (),
    ) -> None:
        self.children = [
            ChildWorker(c.args, c.env)
            for c in consumers(settings, queues, concurrency, sweeper, local_queues, devices)
        ]
        self.drain_seconds = settings.worker_drain_seconds

    def stop(self, timeout: float | None = None) -> None:
        """A warm shutdown of every consumer, within ``timeout`` (the settings'
        ``worker_drain_seconds`` by default)."""
        wait = self.drain_seconds if timeout is None else timeout
        stoppers = [threading.Thread(target=c.stop, args=(wait,)) for c in self.children]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


def supervise(
    settings: Settings,
    queues: list[str],
    concurrency: int | None,
    sweeper: bool,
    local_queues: Collection[str] = (),
    devices: Sequence[str] = (),
) -> None:
    """Run the consumers until SIGTERM or SIGINT, then stop them warm."""
    configure(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group = WorkerGroup(settings, queues, concurrency, sweeper, local_queues, devices)
    log.info(
        "supervising %d worker process(es): %s",
        len(group.children),
        ", ".join(" ".join([str(c.proc.pid), *c.pinned.values()]) for c in group.children),
    )
    # Which broker, said once: with none configured it is the embedded one in the
    # data directory, and a worker started elsewhere would wait on an empty queue.
    log.info("queues %s on %s", ",".join(queues), _broker_name(settings))
    stop.wait()
    log.info("stopping workers")
    group.stop()


def _broker_name(settings: Settings) -> str:
    if settings.embedded_broker:
        return f"the embedded broker in {settings.broker_dir.resolve()} (IMAGEGEN_BROKER_URL unset)"
    scheme, _, rest = settings.resolved_broker_url.partition("://")
    host = rest.rpartition("@")[2]  # never the password
    return f"{scheme}://{host}"
