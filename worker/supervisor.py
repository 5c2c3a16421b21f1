"""``imagegen worker``: a small supervising process and its consumer children.

The process a user (or compose, or systemd) starts does no work itself: it starts
the consumers (``python -m worker ...``) and starts each again whenever it dies,
for whatever reason (a crash, an out-of-memory kill, an unrecoverable error in a
library). With no consumer nothing runs and accepted jobs only wait; SQL leases
hand over whatever a dead consumer held, so a restart loses nothing.

It imports no Celery, SQLAlchemy or provider code: it stays small and cannot be
brought down by what brings a consumer down.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence
from types import FrameType

from shared.core.logs import configure
from shared.core.settings import Settings

log = logging.getLogger(__name__)

PARENT_ENV = "IMAGEGEN_WORKER_PARENT_PID"
# A consumer that dies sooner than this after its start is started again after a
# growing pause (a configuration error would otherwise spin a CPU).
HEALTHY_AFTER_SECONDS = 10.0
MAX_RESTART_DELAY = 30.0


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

    Queues of local models (``local_queues``) get a consumer of their own, one job
    at a time: the pipeline runs one call at a time per device anyway, and a job
    taken while another holds the GPU would only wait there, marked running. It
    alone imports torch."""
    extra = ["--concurrency", str(concurrency)] if concurrency else []
    gpu = [q for q in queues if q in local_queues]
    queues = [q for q in queues if q not in local_queues]
    if not queues:
        return [["--queues", ",".join(gpu), "--concurrency", "1", *_sweeps(sweeper)]]
    children = [["--queues", ",".join(gpu), "--concurrency", "1", "--no-sweeper"]] if gpu else []
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

    def __init__(self, args: list[str]) -> None:
        self.args = [sys.executable, "-m", "worker", *args]
        # Should this process die without stopping it, the child shuts itself down.
        self.env = {**os.environ, PARENT_ENV: str(os.getpid())}
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
        delay = 1.0
        while True:
            code = self.proc.wait()
            lived = time.monotonic() - self.started
            delay = 1.0 if lived >= HEALTHY_AFTER_SECONDS else min(delay * 2, MAX_RESTART_DELAY)
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
    ) -> None:
        self.children = [
            ChildWorker(args)
            for args in consumer_args(settings, queues, concurrency, sweeper, local_queues)
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
) -> None:
    """Run the consumers until SIGTERM or SIGINT, then stop them warm."""
    configure(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group = WorkerGroup(settings, queues, concurrency, sweeper, local_queues)
    log.info(
        "supervising %d worker process(es): %s",
        len(group.children),
        ", ".join(str(c.proc.pid) for c in group.children),
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
