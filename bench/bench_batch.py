"""Batch benchmark, run by hand: ``.venv/bin/python -m bench.bench_batch``.

A 10,000-line OpenAI batch against ``procedural`` at 64x64, with real Redis,
PostgreSQL, an S3 server (moto) on loopback, the API and one ``imagegen worker``
(all queues: it runs the batch queue in a lower-priority child process), or with
``--dedicated`` a default+webhooks worker and ``--batch-workers`` batch-only ones:
time to accept the file (upload + create until in_progress), time to complete,
lost or duplicated lines, and a sync request's latency from another project,
idle and while the batch runs. Targets: completed in <= 60 s, nothing lost or
duplicated, sync p50 during the batch <= 3x its idle p50.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from bench.bench_core import BENCH_ENV, S3Double
from tests.support.processes import ServiceProcess
from tests.support.stack import Stack


def sync_latencies(stack: Stack, stop: threading.Event | None, count: int) -> list[float]:
    out: list[float] = []
    with httpx.Client(
        base_url=stack.base_url, timeout=120, headers={"Authorization": f"Bearer {stack.key_b}"}
    ) as client:
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            resp = client.post(
                "/v1/images/generations",
                json={"model": "procedural", "prompt": "sync", "size": "64x64"},
            )
            assert resp.status_code == 200, resp.text
            out.append(time.perf_counter() - started)
            time.sleep(0.2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument(
        "--dedicated",
        action="store_true",
        help="a worker for default+webhooks and another for batch "
        "(as docker-compose.yml deploys them)",
    )
    parser.add_argument(
        "--batch-workers",
        type=int,
        default=1,
        help="with --dedicated: processes consuming the batch queue "
        "(docker compose up --scale batch-worker=N)",
    )
    parser.add_argument(
        "--storage",
        choices=("moto", "local"),
        default="moto",
        help="moto: S3 through moto's S3 app on loopback; "
        "local: the file store under IMAGEGEN_DATA_DIR, shared by "
        "the API and workers (a single-host deployment). moto's "
        "server is a test double that needs ~5 ms of CPU per PUT "
        "here, so it takes most of a core away from the service",
    )
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # moto's S3 app on its own, without ThreadedMotoServer's per-request dispatch
    # over every AWS service: measured ~40% less CPU per PUT, and every cycle
    # the test double spends is taken from the service on these two cores.
    moto = S3Double()
    # The daily image quota stays on (its cost is measured) but above the batch.
    env = {
        **BENCH_ENV,
        "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "0",
        "IMAGEGEN_PROJECT_IMAGES_PER_DAY": "1000000",
    }
    if args.storage == "local":
        env["IMAGEGEN_S3_BUCKET"] = ""
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="imagegen-bench-batch-")),
        moto.url,
        worker_env=env,
        api_env=env,
    )
    extra: list[ServiceProcess] = []
    try:
        if args.dedicated:
            stack.worker.stop()
            stack.worker = ServiceProcess(
                ["worker", "--queues", "default,webhooks"],
                {**stack.env, **env},
                stack.workdir / "w1.log",
            ).start()
            for n in range(args.batch_workers):
                extra.append(
                    ServiceProcess(
                        ["worker", "--queues", "batch"],
                        {**stack.env, **env},
                        stack.workdir / f"batch{n}.log",
                    ).start()
                )
            time.sleep(3)
        idle = sync_latencies(stack, None, 20)
        client = openai.OpenAI(
            api_key=stack.key_a, base_url=f"{stack.base_url}/v1", max_retries=0, timeout=300
        )
        content = "\n".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/images/generations",
                    "body": {"model": "procedural", "prompt": f"bench {i}", "size": "64x64"},
                }
            )
            for i in range(args.lines)
        ).encode()
        started = time.perf_counter()
        file = client.files.create(file=("bench.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        created = time.perf_counter()
        while client.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.05)
        accepted = time.perf_counter()
        stop = threading.Event()
        during: list[float] = []
        sampler = threading.Thread(
            target=lambda: during.extend(sync_latencies(stack, stop, 10_000))
        )
        sampler.start()
        while (b := client.batches.retrieve(batch.id)).status not in (
            "completed",
            "failed",
            "cancelled",
            "expired",
        ):
            time.sleep(0.5)
        finished = time.perf_counter()
        stop.set()
        sampler.join()
        assert b.output_file_id is not None
        assert b.request_counts is not None
        lines = client.files.content(b.output_file_id).text.splitlines()
        ids = [json.loads(x)["custom_id"] for x in lines]
        workers = (
            f"worker processes: 1 default+webhooks, {args.batch_workers} batch"
            if args.dedicated
            else "one `imagegen worker` (all queues, batch in its child)"
        )
        print(f"batch of {args.lines} lines, procedural 64x64, {workers}, storage {args.storage}")
        print(
            f"  upload + create: {created - started:.1f}s; validated (in_progress) after "
            f"{accepted - started:.1f}s"
        )
        print(
            f"  completed {finished - accepted:.1f}s after validation "
            f"({args.lines / (finished - accepted):.0f} lines/s); total "
            f"{finished - started:.1f}s; status {b.status}"
        )
        print(
            f"  phases (batch timestamps, whole seconds): running "
            f"{(b.finalizing_at or 0) - (b.in_progress_at or 0)}s, finalizing "
            f"{(b.completed_at or 0) - (b.finalizing_at or 0)}s"
        )
        print(
            f"  counts {b.request_counts.completed} completed, {b.request_counts.failed} "
            f"failed; output lines {len(ids)}, distinct custom_ids {len(set(ids))}, "
            f"missing {args.lines - len(set(ids))}"
        )
        p_idle, p_during = statistics.median(idle), statistics.median(during)
        print(
            f"  sync request (another project): idle p50 {p_idle * 1000:.0f} ms, during "
            f"the batch p50 {p_during * 1000:.0f} ms over {len(during)} requests "
            f"(ratio {p_during / p_idle:.1f}x)"
        )
    finally:
        for proc in extra:
            proc.stop()
        stack.close()
        moto.stop()


if __name__ == "__main__":
    main()
