"""Worker start-up.

Concurrency model: Celery's ``threads`` pool with hundreds of threads in one
process. A job spends nearly all its time waiting on a provider (10-150 s per
image), so what matters is how many calls one process holds open, not CPU.
Threads keep every library we use (SQLAlchemy, psycopg, boto3, httpx) in its
ordinary blocking mode, with no monkey-patching (gevent) and no second async
code path; an idle thread costs a stack page or two. bench/ measures how many
jobs one process holds in flight against a slow upstream.
Per-process resources (engine, HTTP client, S3 client, thread pools) are made
once here, before the pool's threads start: made lazily, hundreds of threads
starting together each built their own boto3 client (measured: 85 at once, tens
of seconds of CPU) before the cache filled.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from shared.queue import get_celery
from shared.settings import get_settings
from worker.runner import heartbeat_thread
from worker.sweeper import sweeper_thread
from worker.tasks import register

log = logging.getLogger(__name__)


def warm_up() -> None:
    """Build every per-process resource once, single-threaded."""
    from shared.db import get_engine
    from shared.providers.openai_compat import OpenAICompatibleProvider
    from shared.registry import get_registry
    from shared.storage import get_storage
    from worker.runner import _fanout_pool, _lines_pool
    from worker.webhook_delivery import _client

    get_engine()
    get_registry()
    get_storage()
    get_celery()
    OpenAICompatibleProvider.shared()
    _fanout_pool()
    _lines_pool()
    _client()


PARENT_ENV = "IMAGEGEN_WORKER_PARENT_PID"


def run_worker(queues: list[str], concurrency: int | None = None,
               sweeper: bool = True) -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    child = None
    if (settings.worker_split_batch and settings.batch_queue in queues and len(queues) > 1
            and not settings.embedded_broker):
        # One Python process serving sync and batch jobs gives a sync job a thin
        # share of its GIL while a big batch runs (measured: p50 44 -> 440 ms during
        # a 10,000-line batch). The batch queue gets its own, lower-priority process.
        args = ["--queues", settings.batch_queue, "--no-sweeper"]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        log.info("batch queue %r served by a child process", settings.batch_queue)
        child = ChildWorker(args)
        queues = [q for q in queues if q != settings.batch_queue]
    if set(queues) == {settings.batch_queue} and settings.batch_worker_nice:
        # Batch-only worker: yield the CPU to sync work on shared cores (measured on
        # 2 cores: a sync request's p50 during a 10,000-line batch went from 6.9x
        # its idle p50 to 1.7x, with two batch workers at nice 10).
        os.nice(settings.batch_worker_nice)
        log.info("batch worker at nice %d", settings.batch_worker_nice)
    warm_up()
    app = get_celery()
    register(app)
    stop = threading.Event()
    heartbeat_thread(stop)
    sweeping = sweeper_thread(stop) if sweeper else None
    _exit_with_parent(stop)
    try:
        app.worker_main([
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency or settings.worker_concurrency}",
            f"--queues={','.join(queues)}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ])
    finally:
        stop.set()
        if sweeping is not None:
            sweeping.join(60)  # let a sweep under way (a batch it finalizes) finish
        if child is not None:
            child.stop()


class ChildWorker:
    """``imagegen worker ARGS`` as a child of this process (the dev server's worker,
    a worker's batch child), started again whenever it dies: with no worker nothing
    runs, and accepted jobs only wait (leases hand them over)."""

    def __init__(self, args: list[str]) -> None:
        self.args = [sys.executable, "-m", "shared.cli", "worker", *args]
        # Should this process die without stopping it, the child shuts itself down.
        self.env = {**os.environ, PARENT_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(self.args, env=self.env)
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="worker-supervisor", daemon=True).start()

    def _watch(self) -> None:
        while True:
            code = self.proc.wait()
            if self._stopping.wait(1.0):
                return
            log.warning("worker %s exited (%s); starting it again", self.args[4:], code)
            self.proc = subprocess.Popen(self.args, env=self.env)

    def stop(self, timeout: float = 60) -> None:
        """A warm shutdown: the child finishes the jobs it holds, within ``timeout``."""
        self._stopping.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _exit_with_parent(stop: threading.Event) -> None:
    """A child worker shuts down (warm) when the process that started it is gone,
    however it died; leases recover whatever it held."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != int(parent):
                log.warning("parent process %s is gone; shutting down", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
