"""A consumer process (``python -m worker``), supervised by ``imagegen worker``.

Concurrency model: Celery's ``threads`` pool with hundreds of threads in one
process. A job spends nearly all its time waiting on a provider (10-150 s per
image), so what matters is how many calls one process holds open, not CPU.
Threads keep every library we use (SQLAlchemy, psycopg, obstore, httpx) in its
ordinary blocking mode, with no monkey-patching (gevent) and no second async
code path; an idle thread costs a stack page or two. Measured against the
alternative the issue named (jobs as coroutines on one asyncio loop): a pool of
2,048 threads already holds 2,000 provider calls in flight against a 30 s
upstream at about 96 KB of RSS per call (bench/bench_capacity.py: 143 MB idle,
332 MB with all 2,000 in flight; first reported as 13 KB, measured while a
second worker the bench had left running held part of the calls), within the
100 KB budget, and every job succeeded; the
CPU per job goes to SQL, S3 and HTTP work that an event loop would not remove.
So the pool stays threads, sized 2,048 by default.
Per-process resources (engine, HTTP client, S3 client, thread pools) are made
once here, in the process's context (shared/core/context.py, worker/resources.py),
before the pool's threads start: made lazily, hundreds of threads starting
together each built their own boto3 client (measured: 85 at once, tens of seconds
of CPU).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from shared.core.broker import get_celery
from shared.core.logs import configure
from shared.core.settings import get_settings
from worker.runner import heartbeat_thread
from worker.supervisor import PARENT_ENV, node_name
from worker.sweeper import sweeper_thread
from worker.tasks import register

log = logging.getLogger(__name__)


def warm_up(queues: list[str]) -> None:
    """Build every per-process resource once, single-threaded; load the local models
    this process serves that are marked ``preload``, in registry order, while they
    fit the device's memory budget (the others load when a job needs them)."""
    from shared.core import context
    from shared.providers.openai_compat import OpenAICompatibleProvider
    from shared.registry import get_registry
    from worker import resources

    context.start()  # the engine, storage, Redis and Celery of this process
    get_registry()
    OpenAICompatibleProvider.shared()
    resources.make_all()
    local = [
        m
        for m in get_registry().models
        if m.provider == "diffusers" and m.queue in queues and m.preload
    ]
    if local:
        # Imported only here: workers of other queues never load torch.
        from shared.providers.local.pipelines import preload

        for spec in local:
            preload(spec)


def run_consumer(queues: list[str], concurrency: int | None = None, sweeper: bool = True) -> None:
    """One consumer process: Celery's threads pool over ``queues``."""
    settings = get_settings()
    configure(settings)
    if set(queues) == {settings.batch_queue} and settings.batch_worker_nice:
        # Batch-only worker: yield the CPU to sync work on shared cores (measured on
        # 2 cores: a sync request's p50 during a 10,000-line batch went from 6.9x
        # its idle p50 to 1.7x, with two batch workers at nice 10).
        os.nice(settings.batch_worker_nice)
        log.info("batch worker at nice %d", settings.batch_worker_nice)
    warm_up(queues)
    app = get_celery()
    from shared.registry import get_registry

    # A consumer of local models' queues only (the supervisor gives them their own).
    gpu = set(queues) <= get_registry().local_queues
    register(app, gpu=gpu)
    if gpu:
        from celery.signals import worker_shutting_down

        from worker.gpu.room import close_rooms

        # Its waiting jobs go back to the broker at once: only the call under way
        # is waited for (the drain and the pod's grace period bound a shutdown).
        worker_shutting_down.connect(lambda **_: close_rooms(), weak=False)
    stop = threading.Event()
    heartbeat_thread(stop)
    sweeping = sweeper_thread(stop) if sweeper else None
    _exit_with_parent(stop)
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency or settings.worker_concurrency}",
                f"--queues={','.join(queues)}",
                f"--hostname={node_name(queues, os.getpid())}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        stop.set()
        if sweeping is not None:
            sweeping.join(60)  # let a sweep under way (a batch it finalizes) finish


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
