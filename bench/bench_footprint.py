"""What one job costs each part of a deployment, run by hand (issue 28): the
figures the capacity plan in ``docs/capacity.md`` is derived from.

    .venv/bin/python -m bench.bench_footprint --jobs 1000

Real Redis, PostgreSQL, moto's S3 app (in this process, behind a WSGI wrapper
that counts its requests by method) and the fake upstream (instant answers);
``imagegen api`` and ``imagegen worker`` as processes of their own. Three phases:

1. *accept*: the worker stopped, ``--jobs`` async generations (each with an
   ``Idempotency-Key``, as a careful client sends) at concurrency 32: the API
   process's CPU per accepted job, and the broker's (Redis) memory per queued
   job (``used_memory`` before and after, every job still queued);
2. *work*: a worker started: its processes' CPU per job (supervisor and
   consumers) and the S3 requests per job;
3. *read*: each job polled once (``GET /v1/images/jobs/{id}``), then ``--sync``
   sync generations at concurrency 32: the API's CPU per poll and per sync
   request.

Then the database's bytes per job: the growth of every table with its indexes
and TOAST (``pg_total_relation_size``) over the run, divided by the jobs (sync
ones included), after a VACUUM so dead tuples are not counted. The images are
the fake upstream's 64x64 ones unless ``--size 1024x1024`` asks for pictures of
realistic weight (then the worker's CPU and S3's bytes in are a real image's).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import sqlalchemy as sa
from werkzeug.serving import make_server

from bench.bench_core import BENCH_ENV, count_status, wait_done
from tests.support.processes import free_port
from tests.support.stack import Stack

S3_REQUESTS: Counter[str] = Counter()
_lock = threading.Lock()


def counting(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with _lock:
            S3_REQUESTS[environ["REQUEST_METHOD"]] += 1
            S3_REQUESTS["bytes in"] += int(environ.get("CONTENT_LENGTH") or 0)
        return app(environ, start_response)

    return wrapped


def start_s3() -> str:
    from moto.server import create_backend_app  # type: ignore[attr-defined]

    port = free_port()
    server = make_server("127.0.0.1", port, counting(create_backend_app("s3")), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and every descendant alive now (user + system)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    return float(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])) / 2**20


def table_bytes(url: str) -> dict[str, int]:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("VACUUM"))
            rows = conn.execute(
                sa.text(
                    "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
                    "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
                )
            ).all()
    finally:
        engine.dispose()
    return {str(name): int(size) for name, size in rows}


def run(stack: Stack, base: str, jobs: int, body: dict[str, Any], async_: bool) -> list[str]:
    headers = {"Authorization": f"Bearer {stack.key_a}"}
    if async_:
        headers["Prefer"] = "respond-async"
    ids: list[str] = []
    with httpx.Client(
        base_url=base, timeout=120, headers=headers, limits=httpx.Limits(max_connections=64)
    ) as client:

        def one(_: int) -> None:
            resp = client.post(
                "/v1/images/generations",
                json=body,
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert resp.status_code in (200, 202), resp.text
            if async_:
                ids.append(resp.json()["id"])

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(jobs)))
    return ids


def db_counters(url: str) -> dict[str, int]:
    """The database's commits and rows written so far (pg_stat_database)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted "
                    "FROM pg_stat_database WHERE datname = current_database()"
                )
            ).one()
    finally:
        engine.dispose()
    return dict(zip(("commits", "inserted", "updated", "deleted"), map(int, row), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)  # a project's in-flight cap
    parser.add_argument("--sync", type=int, default=500)
    # 1024x1024: the fake answers a picture of realistic weight (half noise, a 1.6 MB
    # PNG), so the worker's CPU and S3's bytes are a real image's.
    parser.add_argument("--size", default="64x64", choices=["64x64", "1024x1024"])
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # The polls of phase 3 would pass a key's default 600 requests a minute.
    api_env = {**BENCH_ENV, "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "100000"}
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="imagegen-bench-")),
        start_s3(),
        worker_env=BENCH_ENV,
        api_env=api_env,
    )
    r = redis.Redis.from_url(stack.redis.url)
    prompt = f"footprint {uuid.uuid4().hex[:8]}"
    noise = " [noise]" if args.size == "1024x1024" else ""
    body = {"model": "fake-fast", "prompt": prompt + noise, "size": args.size}
    try:
        run(stack, stack.base_url, 20, body, async_=False)  # warm both processes
        assert stack.worker is not None
        stack.worker.stop()
        assert stack.api.proc is not None
        api_pid = stack.api.proc.pid
        tables_before = table_bytes(stack.database_url)
        db_before = db_counters(stack.database_url)
        S3_REQUESTS.clear()

        # 1. accept, nothing consumed
        mem_before = int(r.info("memory")["used_memory"])
        cpu_before = cpu_seconds(api_pid)
        started = time.perf_counter()
        ids = run(stack, stack.base_url, args.jobs, body, async_=True)
        accept_s = time.perf_counter() - started
        api_accept = (cpu_seconds(api_pid) - cpu_before) / args.jobs
        queued = count_status(stack, "queued", prompt)
        mem_per_job = (int(r.info("memory")["used_memory"]) - mem_before) / args.jobs
        print(f"accept: {args.jobs} async jobs in {accept_s:.1f} s ({args.jobs / accept_s:.0f}/s)")
        print(f"  API CPU per accepted job: {api_accept * 1000:.2f} ms")
        print(f"  jobs queued: {queued}; Redis memory per queued job: {mem_per_job:.0f} B")
        print(f"  S3 requests while accepting: {dict(S3_REQUESTS)}")

        # 2. work
        S3_REQUESTS.clear()
        worker = stack.new_worker(BENCH_ENV)
        time.sleep(3)  # consumers up before their CPU is counted
        assert worker.proc is not None
        worker_before = cpu_seconds(worker.proc.pid)
        started = time.perf_counter()
        wait_done(stack, prompt, args.jobs + 20, timeout=600)
        work_s = time.perf_counter() - started
        time.sleep(1)
        worker_cpu = (cpu_seconds(worker.proc.pid) - worker_before) / args.jobs
        s3 = {k: v / args.jobs for k, v in S3_REQUESTS.items()}
        print(f"work: {args.jobs} jobs done in {work_s:.1f} s ({args.jobs / work_s:.0f}/s)")
        print(f"  worker CPU per job (supervisor + consumers): {worker_cpu * 1000:.2f} ms")
        print(f"  S3 requests per job (1 image each): {s3}")
        print(f"  RSS: API {rss_mb(api_pid):.0f} MB, worker {rss_mb(worker.proc.pid):.0f} MB")

        # 3. read
        headers = {"Authorization": f"Bearer {stack.key_a}"}
        cpu_before = cpu_seconds(api_pid)
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:

            def poll(job_id: str) -> None:
                resp = client.get(f"/v1/images/jobs/{job_id}")
                assert resp.status_code == 200, (resp.status_code, resp.text[:300])

            with ThreadPoolExecutor(32) as pool:
                list(pool.map(poll, ids))
        api_poll = (cpu_seconds(api_pid) - cpu_before) / len(ids)
        cpu_before = cpu_seconds(api_pid)
        worker_before = cpu_seconds(worker.proc.pid)
        lat_started = time.perf_counter()
        run(stack, stack.base_url, args.sync, {**body, "response_format": "url"}, async_=False)
        sync_s = time.perf_counter() - lat_started
        api_sync = (cpu_seconds(api_pid) - cpu_before) / args.sync
        worker_sync = (cpu_seconds(worker.proc.pid) - worker_before) / args.sync
        print(f"read: API CPU per poll {api_poll * 1000:.2f} ms")
        print(
            f"  sync (url): {args.sync / sync_s:.0f}/s; API CPU per request"
            f" {api_sync * 1000:.2f} ms, worker CPU {worker_sync * 1000:.2f} ms"
        )

        tables_after = table_bytes(stack.database_url)
        total_jobs = args.jobs + args.sync
        # pg_stat_database is updated by each backend when its transaction ends, a
        # little late: let the last ones land.
        time.sleep(1)
        db_after = db_counters(stack.database_url)
        per_job = {k: (db_after[k] - db_before[k]) / total_jobs for k in db_after}
        print(f"database work per job (whole run, polls included): {per_job}")
        growth = {
            name: (tables_after.get(name, 0) - tables_before.get(name, 0)) / total_jobs
            for name in tables_after
        }
        print(f"database bytes per job ({total_jobs} jobs, tables with indexes and TOAST):")
        for name, per in sorted(growth.items(), key=lambda kv: -kv[1]):
            if per > 0:
                print(f"  {name}: {per:.0f} B")
        print(f"  total: {sum(v for v in growth.values() if v > 0):.0f} B")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
