"""Purge benchmark, run by hand: ``.venv/bin/python -m bench.bench_purge``.

100,000 expired images across 10,000 finished jobs (rows inserted straight into
PostgreSQL, objects put straight into an S3 double: moto in a process of its own,
counting the requests it serves), then one pass of the purge in a process of its
own (as a worker runs the ``imagegen.purge`` task): how long it takes, the S3
calls it makes (expected: ~100 DeleteObjects of 1,000 keys), and the API's p50 for
a cheap request (GET a job) during the purge against idle (goal: at most 1.5x).
Real Redis, PostgreSQL, the API and a worker as separate processes (tests/support/
stack.py); the worker's own purge is put off (IMAGEGEN_PURGE_INTERVAL_SECONDS)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import sqlalchemy as sa
from botocore.config import Config

from shared.core.clock import utcnow
from tests.support.expired import seed_jobs
from tests.support.processes import free_port, wait_http
from tests.support.stack import Stack

_COUNTING_S3 = """
import json, logging, threading, time
from collections import Counter
from moto.server import create_backend_app
from werkzeug.serving import make_server

logging.getLogger("werkzeug").setLevel(logging.WARNING)
counts, lock, app = Counter(), threading.Lock(), create_backend_app("s3")

def operation(environ):
    method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if method == "GET" and "list-type=2" in query:
        return "ListObjectsV2"
    return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject"}.get(method, method)

def counting(environ, start_response):
    if environ["PATH_INFO"] == "/__counts__":
        with lock:
            body = json.dumps(counts).encode()
            if environ["REQUEST_METHOD"] == "POST":
                counts.clear()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    with lock:
        counts[operation(environ)] += 1
    return app(environ, start_response)

make_server("127.0.0.1", PORT, counting, threaded=True).serve_forever()
"""

_PURGE = """
import json, resource, time
from shared.core import context
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.retention.purge import purge_once
context.start()
started = time.perf_counter()
purged = purge_once(get_storage(), duty=get_settings().purge_duty_cycle)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - started, "images": purged.images,
                  "objects": purged.objects, "delete_calls": purged.delete_calls,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime}))
"""


class CountingS3:
    """moto's S3 in its own process, counting each request by operation."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = _COUNTING_S3.replace("PORT", str(self.port))
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        wait_http(self.url)

    def counts(self, reset: bool = False) -> dict[str, int]:
        resp = httpx.request("POST" if reset else "GET", f"{self.url}/__counts__")
        counted: dict[str, int] = resp.json()
        return counted

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def latencies(client: httpx.Client, path: str, until: threading.Event | int) -> list[float]:
    """GET ``path`` one after another: ``until`` requests, or until the event is set."""
    found: list[float] = []
    while True:
        if isinstance(until, int) and len(found) >= until:
            return found
        if isinstance(until, threading.Event) and until.is_set():
            return found
        started = time.perf_counter()
        resp = client.get(path)
        assert resp.status_code == 200, resp.text
        found.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--images-per-job", type=int, default=10)
    parser.add_argument("--idle-requests", type=int, default=400)
    parser.add_argument(
        "--duty",
        type=float,
        nargs="+",
        default=[0.5],
        help="IMAGEGEN_PURGE_DUTY_CYCLE of each round (a round seeds its own images)",
    )
    args = parser.parse_args()

    s3 = CountingS3()
    workdir = Path(tempfile.mkdtemp(prefix="bench_purge_"))
    env = {
        "IMAGEGEN_PURGE_INTERVAL_SECONDS": "86400",
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        # One client reading as fast as it can: no per-key rate limit in the way.
        "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "0",
    }
    stack = Stack(workdir, s3.url, worker_env=env, api_env=env)
    try:
        run(stack, s3, args)
    finally:
        stack.close()
        s3.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(stack: Stack, s3: CountingS3, args: argparse.Namespace) -> None:
    client = httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.key_a}"}, timeout=60
    )
    made = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"model": "fake-fast", "prompt": "the cheap read", "size": "64x64"},
    )
    assert made.status_code == 202, made.text
    path = f"/v1/images/jobs/{made.json()['id']}"
    engine = sa.create_engine(stack.database_url)
    s3_client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(max_pool_connections=32),
    )
    for duty in args.duty:
        print(
            json.dumps(one_round(stack, s3, s3_client, engine, client, path, duty, args), indent=2)
        )
    engine.dispose()


def one_round(
    stack: Stack,
    s3: CountingS3,
    s3_client: Any,
    engine: sa.Engine,
    client: httpx.Client,
    path: str,
    duty: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Seed a project's expired images, then purge them at ``duty``."""
    name = f"purged-{duty}"
    stack.create_key(name)
    with engine.begin() as conn:
        project_id = conn.execute(
            sa.text(
                "UPDATE project SET image_retention_seconds = 3600 WHERE name = :n RETURNING id"
            ),
            {"n": name},
        ).scalar_one()
    bucket = stack.env["IMAGEGEN_S3_BUCKET"]
    images = args.jobs * args.images_per_job
    started = time.perf_counter()
    seed_jobs(
        engine,
        lambda key: s3_client.put_object(Bucket=bucket, Key=key, Body=b"x"),
        str(project_id),
        jobs=args.jobs,
        images_per_job=args.images_per_job,
        created_at=utcnow() - timedelta(hours=2),
        threads=32,
    )
    print(f"seeded {images} images of {args.jobs} jobs in {time.perf_counter() - started:.1f} s")

    latencies(client, path, 50)  # warm-up
    idle = latencies(client, path, args.idle_requests)
    s3.counts(reset=True)
    assert stack.api.proc is not None
    api_cpu, s3_cpu = cpu_seconds(stack.api.proc.pid), cpu_seconds(s3.proc.pid)

    done = threading.Event()
    during: list[float] = []
    reader = threading.Thread(target=lambda: during.extend(latencies(client, path, done)))
    reader.start()
    purge = subprocess.run(
        [sys.executable, "-c", _PURGE],
        env={**stack.env, "IMAGEGEN_PURGE_DUTY_CYCLE": str(duty)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    done.set()
    reader.join()
    assert purge.returncode == 0, purge.stderr
    result: dict[str, Any] = json.loads(purge.stdout.strip().splitlines()[-1])
    api_cpu = cpu_seconds(stack.api.proc.pid) - api_cpu
    s3_cpu = cpu_seconds(s3.proc.pid) - s3_cpu
    counts = s3.counts()
    with engine.connect() as conn:
        left = conn.execute(
            sa.text("SELECT count(*) FROM image WHERE project_id = :p AND expired_at IS NULL"),
            {"p": project_id},
        ).scalar_one()
    p50_idle, p50_during = statistics.median(idle), statistics.median(during)
    return {
        "duty_cycle": duty,
        "images": images,
        "jobs": args.jobs,
        "purge_seconds": round(result["seconds"], 1),
        "images_expired": result["images"],
        "images_left": left,
        "s3_requests_during_purge": counts,
        "purge_process_cpu_s": round(result["cpu_seconds"], 1),
        "s3_double_cpu_s": round(s3_cpu, 1),
        "api_cpu_s_serving_reads": round(api_cpu, 1),
        "api_p50_idle_ms": round(p50_idle * 1000, 2),
        "api_p50_during_ms": round(p50_during * 1000, 2),
        "api_requests_during": len(during),
        "ratio": round(p50_during / p50_idle, 2),
    }


if __name__ == "__main__":
    main()
