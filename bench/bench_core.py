"""Core benchmark, run by hand: ``.venv/bin/python -m bench.bench_core``.

Real Redis, PostgreSQL, an S3 server (moto) and a fake upstream, all on
loopback; the API and one worker as separate processes.
(a) sync b64_json requests against an instant upstream: throughput and p50/p99
    at concurrency 1 and 32;
(b) end-to-end async jobs per second;
(c) how many jobs one worker process holds in flight against an upstream that
    takes 2 s per image.
Quote medians and ratios from one run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import sqlalchemy as sa
from moto.server import ThreadedMotoServer

from tests.support.processes import free_port, wait_http
from tests.support.stack import Stack

BENCH_ENV = {
    "IMAGEGEN_PROVIDER_TIMEOUT_SECONDS": "60",
    "IMAGEGEN_REDELIVER_AFTER_SECONDS": "600",
    "IMAGEGEN_JOB_LEASE_SECONDS": "60",
    "IMAGEGEN_SWEEP_INTERVAL_SECONDS": "5",
    "IMAGEGEN_WORKER_CONCURRENCY": "256",
    "IMAGEGEN_LOG_LEVEL": "WARNING",
}


class S3Double:
    """moto's S3 app in a process of its own: in the benchmark's process it would
    take the GIL from the load generator's threads (and so slow whichever side is
    measured while it serves), and its CPU could not be told apart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (
            "import logging, time\n"
            "from tests.support.processes import S3Server\n"
            "logging.getLogger('werkzeug').setLevel(logging.WARNING)\n"
            f"S3Server({self.port}).start()\n"
            "time.sleep(10**9)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        wait_http(self.url)  # moto answers ListBuckets at /

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


SYNC_BODY = {
    "model": "fake-fast",
    "prompt": "bench sync",
    "size": "64x64",
    "response_format": "b64_json",
}


def sync_load(
    base_url: str, key: str, concurrency: int, requests: int, body: dict[str, str] = SYNC_BODY
) -> dict[str, float]:
    """Throughput and latency of ``requests`` sync generations at ``concurrency``."""
    latencies: list[float] = []
    with httpx.Client(
        base_url=base_url,
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=concurrency * 2),
    ) as client:

        def one(_: int) -> None:
            started = time.perf_counter()
            resp = client.post("/v1/images/generations", json=body)
            assert resp.status_code == 200, resp.text
            latencies.append(time.perf_counter() - started)

        for i in range(min(10, requests)):  # warm-up
            one(i)
        latencies.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
    return {
        "rps": requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
    }


def count_status(stack: Stack, status: str, prefix: str) -> int:
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM job WHERE status = :s AND request->>'prompt' LIKE :p"
                    ),
                    {"s": status, "p": prefix + "%"},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def finish_offsets(stack: Stack, prefix: str, since: float) -> list[float]:
    """Seconds from ``since`` (a Unix time) to each job's finish."""
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.text(
                        "SELECT extract(epoch FROM finished_at) FROM job "
                        "WHERE request->>'prompt' LIKE :p"
                    ),
                    {"p": prefix + "%"},
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    return sorted(float(r) - since for r in rows)


def submit_async(stack: Stack, jobs: int, prompt: str, model: str, size: str = "64x64") -> float:
    body = {"model": model, "prompt": prompt, "size": size}
    with httpx.Client(
        base_url=stack.base_url,
        timeout=120,
        headers={"Authorization": f"Bearer {stack.key_a}", "Prefer": "respond-async"},
        limits=httpx.Limits(max_connections=64),
    ) as client:

        def one(_: int) -> None:
            resp = client.post("/v1/images/generations", json=body)
            assert resp.status_code == 202, resp.text

        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(jobs)))
        return time.perf_counter() - started


def wait_done(stack: Stack, prefix: str, jobs: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while count_status(stack, "succeeded", prefix) < jobs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {count_status(stack, 'succeeded', prefix)}/{jobs} done")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sync-requests", type=int, default=400)
    parser.add_argument("--async-jobs", type=int, default=1000)
    parser.add_argument("--slow-jobs", type=int, default=400)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="imagegen-bench-")),
        f"http://127.0.0.1:{port}",
        worker_env=BENCH_ENV,
        api_env=BENCH_ENV,
    )
    try:
        print("(a) sync b64_json, instant upstream, 64x64")
        for concurrency in (1, 32):
            r = sync_load(
                stack.base_url,
                stack.key_a,
                concurrency,
                args.sync_requests if concurrency > 1 else 100,
            )
            print(
                f"    concurrency {concurrency:>2}: {r['rps']:7.1f} req/s  "
                f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms"
            )

        print(f"(b) end-to-end async jobs, {args.async_jobs} jobs, instant upstream")
        started = time.perf_counter()
        submit_s = submit_async(stack, args.async_jobs, "bench async", "fake-fast")
        wait_done(stack, "bench async", args.async_jobs, 600)
        total = time.perf_counter() - started
        print(
            f"    accepted in {submit_s:.1f}s ({args.async_jobs / submit_s:.0f} jobs/s); "
            f"all done in {total:.1f}s: {args.async_jobs / total:.0f} jobs/s end to end"
        )

        print(f"(c) {args.slow_jobs} jobs against an upstream taking 2 s per image, one worker")
        # Queue every job first with no worker running, then start one worker:
        # the figure is what one process holds, not how fast we can submit.
        stack.worker.stop()
        submit_async(stack, args.slow_jobs, "[slow=2] bench slow", "fake-fast")
        stack.upstream.max_in_flight = 0
        started = time.perf_counter()
        wall = time.time()
        stack.new_worker(BENCH_ENV)
        wait_done(stack, "[slow=2] bench slow", args.slow_jobs, 600)
        total = time.perf_counter() - started
        offsets = finish_offsets(stack, "[slow=2] bench slow", wall)
        print(
            f"    finished after worker start: first {offsets[0]:.1f}s, "
            f"p50 {statistics.median(offsets):.1f}s, p90 {pct(offsets, 90):.1f}s, "
            f"last {offsets[-1]:.1f}s"
        )
        print(
            f"    peak upstream calls in flight: {stack.upstream.max_in_flight}; "
            f"{args.slow_jobs} jobs in {total:.1f}s "
            f"(serial would take {args.slow_jobs * 2}s)"
        )
    finally:
        stack.close()
        moto.stop()


if __name__ == "__main__":
    main()
