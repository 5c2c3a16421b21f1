"""Provider calls one worker process holds in flight, run by hand (issue 11), and
its memory when they all return at once (issue 24):

    .venv/bin/python -m bench.bench_capacity --jobs 2000 --seconds 30
    .venv/bin/python -m bench.bench_capacity --jobs 2000 --seconds 30 --size 1024x1024 \
        --answer-slots 16        # and 4096: every answer read at once, as before
    .venv/bin/python -m bench.bench_capacity --queue-provider --jobs 2000 --seconds 60

Real Redis, PostgreSQL, moto's S3 server and the fake upstream, each call to which
takes ``--seconds``. The jobs are queued with no worker running, then one worker
starts (``IMAGEGEN_WORKER_CONCURRENCY=--concurrency``): the figure is what one
process holds, not how fast we submit. Reported: the peak of calls the upstream
saw at once, the consumer process's RSS idle (a worker started alone first) and
at that peak, RSS per call in flight, and whether every job succeeded.

With ``--size 1024x1024`` the upstream answers each call with a picture of
realistic weight (half noise: a 1.6 MB PNG, 2.1 MB as base64), so the peak RSS
after the calls return is the completion burst's cost; ``--answer-slots`` sets
IMAGEGEN_WORKER_ANSWER_SLOTS (shared/providers/answers.py). A consumer past
``--max-rss-mb`` is killed and reported as such, so an unbounded burst cannot take
the machine down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from moto.server import ThreadedMotoServer

from bench.bench_core import BENCH_ENV, S3Double, count_status, submit_async
from tests.support.fakes.replicate import EXPECTED_TOKEN as REPLICATE_TOKEN
from tests.support.fakes.replicate import FakeReplicate
from tests.support.processes import free_port
from tests.support.stack import Stack

PAGE = 4096


def _rss_kb(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE // 1024


def consumer_pid(root: int) -> int | None:
    """The worker's consumer of the default queue (a child of ``imagegen worker``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == root and " worker" in cmd and "default" in cmd:
            return int(entry.name)
    return None


def _wait_consumer(stack: Stack) -> int:
    assert stack.worker is not None
    assert stack.worker.proc is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = consumer_pid(stack.worker.proc.pid)
        if pid is not None:
            return pid
        time.sleep(0.2)
    raise TimeoutError("no consumer process")


def main() -> None:
    args = _args()
    if args.queue_provider:
        queue_provider(args)
    else:
        in_flight(args)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=2048)
    parser.add_argument("--size", default="64x64", help="64x64 (flat) or e.g. 1024x1024")
    parser.add_argument("--answer-slots", type=int, default=None)
    parser.add_argument("--max-rss-mb", type=int, default=8000)
    parser.add_argument(
        "--queue-provider",
        action="store_true",
        help="a queue-style provider (a fake Replicate) whose predictions take --seconds",
    )
    return parser.parse_args()


def in_flight(args: argparse.Namespace) -> None:
    """Calls one consumer holds in flight, and its memory (issues 11 and 24)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    large = args.size != "64x64"
    # Large: every call held until all are in flight, then answered at once.
    prompt = "[gate] [noise] capacity" if large else f"[slow={args.seconds:g}] capacity"
    worker_env = {**BENCH_ENV, "IMAGEGEN_WORKER_CONCURRENCY": str(args.concurrency)}
    if args.answer_slots is not None:
        worker_env["IMAGEGEN_WORKER_ANSWER_SLOTS"] = str(args.answer_slots)
    api_env = {
        **BENCH_ENV,
        "IMAGEGEN_PROJECT_JOBS_IN_FLIGHT": "0",
        "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "0",
    }

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    workdir = Path(tempfile.mkdtemp(prefix="imagegen-capacity-"))
    stack = Stack(workdir, f"http://127.0.0.1:{port}", worker_env=worker_env, api_env=api_env)
    try:
        # The stack's own worker stopped first: the figures are one process's.
        assert stack.worker is not None
        stack.worker.stop()
        # Idle: the same worker, started with nothing to do.
        stack.new_worker(worker_env)
        pid = _wait_consumer(stack)
        time.sleep(8)
        idle = _rss_kb(pid)
        assert stack.worker is not None
        stack.worker.stop()

        submit_s = submit_async(stack, args.jobs, prompt, "fake-fast", args.size)
        print(f"queued {args.jobs} jobs in {submit_s:.1f}s; starting one worker")
        stack.upstream.max_in_flight = 0
        started = time.monotonic()
        stack.new_worker(worker_env)
        pid = _wait_consumer(stack)
        peak = {"rss": 0, "calls": 0, "rss_at_calls": idle}
        done = threading.Event()

        killed = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                rss, calls = _rss_kb(pid), stack.upstream.in_flight
                peak["rss"] = max(peak["rss"], rss)
                if calls >= peak["calls"]:
                    peak["calls"], peak["rss_at_calls"] = calls, rss
                if rss > args.max_rss_mb * 1024:
                    os.kill(pid, signal.SIGKILL)
                    killed.set()
                    done.set()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if large:
            gate_deadline = time.monotonic() + 300
            while stack.upstream.in_flight < args.jobs and time.monotonic() < gate_deadline:
                time.sleep(0.2)
            held = stack.upstream.in_flight
            before_burst = _rss_kb(pid)
            print(f"{held} calls held; RSS {before_burst / 1024:.0f} MB; answering all at once")
            stack.upstream.gate.set()
        deadline = time.monotonic() + args.seconds * 10 + 300
        last_report = time.monotonic()
        while (succeeded := count_status(stack, "succeeded", prompt)) < args.jobs:
            if time.monotonic() > deadline or killed.is_set():
                break
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                print(
                    f"  {last_report - started:4.0f}s: {stack.upstream.in_flight} calls in "
                    f"flight, {succeeded} succeeded, RSS {_rss_kb(pid) / 1024:.0f} MB",
                    flush=True,
                )
            time.sleep(1)
        done.set()
        sampler.join()
        total = time.monotonic() - started
        failed = count_status(stack, "failed", prompt)
        calls = peak["calls"]
        per_call = (peak["rss_at_calls"] - idle) / max(1, calls)
        print(f"peak upstream calls in flight: {calls} (upstream's own count)")
        mb = {k: v / 1024 for k, v in peak.items()}
        print(
            f"consumer RSS: idle {idle / 1024:.0f} MB, at that peak "
            f"{mb['rss_at_calls']:.0f} MB, max {mb['rss']:.0f} MB"
        )
        print(f"RSS per call in flight: {per_call:.0f} KB")
        if killed.is_set():
            print(f"KILLED: the consumer passed --max-rss-mb {args.max_rss_mb}")
        print(
            f"{succeeded}/{args.jobs} succeeded, {failed} failed, "
            f"in {total:.0f}s after the worker started"
        )
    finally:
        stack.close()
        moto.stop()


def queue_provider(args: argparse.Namespace) -> None:
    """Issue 27: ``--jobs`` jobs on a queue-style provider (a fake Replicate over
    HTTP, its predictions done ``--seconds`` after they were created), one worker.
    Sampled twice a second: the predictions pending upstream (calls in flight), the
    jobs a worker holds (``running`` rows: a slot each), the consumer's RSS. Then
    whether every job succeeded with one create each, and the looks it took."""
    replicate = FakeReplicate(seconds=args.seconds).start()
    env = {**BENCH_ENV, "REPLICATE_API_TOKEN": REPLICATE_TOKEN}
    worker_env = {**env, "IMAGEGEN_WORKER_CONCURRENCY": str(args.concurrency)}
    api_env = {
        **env,
        "IMAGEGEN_PROJECT_JOBS_IN_FLIGHT": "0",
        "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "0",
    }
    model = {
        "name": "flux-queue",
        "provider": "replicate",
        "base_url": replicate.base_url,
        "api_key_env": "REPLICATE_API_TOKEN",
        "upstream_model": "black-forest-labs/flux-schnell",
        "capabilities": {"sizes": ["256x256"], "max_n": 1},
    }
    moto = S3Double()
    workdir = Path(tempfile.mkdtemp(prefix="imagegen-capacity-queue-"))
    stack = Stack(workdir, moto.url, worker_env=worker_env, api_env=api_env, extra_models=[model])
    prompt = "queued capacity"
    try:
        pid = _wait_consumer(stack)
        idle = _rss_kb(pid)
        started = time.monotonic()
        submit_s = submit_async(stack, args.jobs, prompt, "flux-queue", "256x256")
        print(
            f"submitted {args.jobs} jobs in {submit_s:.1f}s; each prediction takes "
            f"{args.seconds:g}s"
        )
        engine = sa.create_engine(stack.database_url)
        samples: list[tuple[float, int, int, int]] = []  # t, pending upstream, held, rss
        deadline = started + args.seconds * 5 + 300
        succeeded = 0
        while succeeded < args.jobs and time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT status, count(*) FROM job GROUP BY status"))
                counts: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
            succeeded = int(counts.get("succeeded", 0))
            with replicate.served.lock:
                pending = sum(
                    1
                    for p in replicate.predictions.values()
                    if p["status"] in ("starting", "processing")
                )
            samples.append(
                (time.monotonic() - started, pending, int(counts.get("running", 0)), _rss_kb(pid))
            )
            if len(samples) % 20 == 0:
                t, up, holding, rss = samples[-1]
                print(
                    f"  {t:4.0f}s: {up} predictions pending upstream, {holding} jobs held by "
                    f"a worker, {succeeded} succeeded, RSS {rss / 1024:.0f} MB",
                    flush=True,
                )
            time.sleep(0.5)
        total = time.monotonic() - started
        engine.dispose()
        waiting = [s for s in samples if s[1] >= args.jobs * 0.9]
        held = sorted(s[2] for s in waiting) or [0]
        print(f"all {args.jobs} succeeded: {succeeded == args.jobs} ({succeeded}) in {total:.0f}s")
        print(f"peak predictions pending upstream: {max(s[1] for s in samples)}")
        print(
            f"while >= 90% were pending upstream ({len(waiting)} samples): jobs held by a "
            f"worker median {held[len(held) // 2]}, max {held[-1]}"
        )
        top = max(s[3] for s in samples)
        print(f"consumer RSS: idle {idle / 1024:.0f} MB, max {top / 1024:.0f} MB")
        looks = sum(replicate.looks.values())
        print(
            f"creates: {replicate.submits} for {args.jobs} jobs; looks: {looks} "
            f"({looks / max(1, args.jobs):.1f} a job)"
        )
    finally:
        stack.close()
        moto.stop()
        replicate.stop()


if __name__ == "__main__":
    main()
