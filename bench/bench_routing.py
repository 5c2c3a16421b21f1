"""Many upstreams behind one model (issue 26), run by hand:

    .venv/bin/python -m bench.bench_routing                      # 2,000 lines
    .venv/bin/python -m bench.bench_routing --kill-after 10      # one dies mid-run
    .venv/bin/python -m bench.bench_routing --fair               # two projects share

Three fake deployments (tests/support/fake_upstream.py, each a process of its
own) rate-limited to 60, 120 and 180 images a minute times ``--scale`` (10: 600,
1,200 and 1,800, so a short run), answering OpenAI's 429 past their limits, each
call taking ``--delay`` seconds. One model ``spread`` over the three, each
deployment declaring its limit (``images_per_minute``) and weighted by it. A
``--lines`` OpenAI batch through the `openai` package, with real Redis,
PostgreSQL, moto's S3 server, the API and one ``imagegen worker``, and an
interactive sync request to the same model from another project every second.

Reported: the batch's completion time against the ideal (lines divided by the
summed limits; with ``--kill-after`` the one killed counts until it dies), the
share of the summed limits used, the 429s each deployment answered (as the
worker saw them: ``imagegen_deployment_calls_total`` in /metrics) and its
cooldowns, the lines that failed, and the interactive p50 during the batch
against its idle p50. Targets: >= 95% of the limits used, at most one 429 per
deployment per cooldown, interactive p50 at most 2x idle, nothing failed.

``--fair``: instead, two projects' batches at once, the same lines in all: one
project in one batch, the other in two. Reported: each project's share of the
lines done when half of all were, and when each project finished. Fair: half
each, whatever the number of batches.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.bench_core import BENCH_ENV, S3Double, finish_offsets
from tests.support.processes import free_port, wait_http
from tests.support.stack import Stack

LIMITS = (60, 120, 180)
MODEL = "spread"


class Deployment:
    """A fake upstream in a process of its own."""

    def __init__(self, name: str, per_minute: int, delay: float) -> None:
        self.name, self.per_minute = name, per_minute
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_upstream",
                "--port",
                str(self.port),
                "--images-per-minute",
                str(per_minute),
                "--delay",
                str(delay),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.killed_at: float | None = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base_url}/files/none", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"fake upstream {name} did not start")

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "provider": "openai",
            "base_url": self.base_url,
            "api_key_env": "FAKE_UPSTREAM_KEY",
            "upstream_model": "fake-fast",
            "weight": self.per_minute,
            "images_per_minute": self.per_minute,
        }

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.killed_at = time.perf_counter()


def interactive(
    stack: Stack, stop: threading.Event | None, count: int, every: float
) -> list[float]:
    """Sync requests to the model from another project, one each ``every`` seconds."""
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
                json={"model": MODEL, "prompt": "interactive", "size": "64x64"},
            )
            assert resp.status_code == 200, resp.text
            out.append(time.perf_counter() - started)
            time.sleep(max(0.0, every - (time.perf_counter() - started)))
    return out


def deployment_metrics(stack: Stack) -> dict[str, dict[str, float]]:
    """Per deployment: calls by outcome and cooldowns, from /metrics."""
    text = httpx.get(
        f"{stack.base_url}/metrics", headers={"Authorization": "Bearer sk-admin-test"}
    ).text
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        calls = re.match(
            r'imagegen_deployment_calls_total\{deployment="([^"]+)",model="spread",'
            r'outcome="([^"]+)"\} ([0-9.e+]+)',
            line,
        )
        if calls:
            found.setdefault(calls[1], {})[calls[2]] = float(calls[3])
        cooled = re.match(
            r'imagegen_deployment_cooldowns_total\{deployment="([^"]+)",model="spread"\} '
            r"([0-9.e+]+)",
            line,
        )
        if cooled:
            found.setdefault(cooled[1], {})["cooldowns"] = float(cooled[2])
        waits = re.match(
            r'imagegen_capacity_waits_total\{how="([^"]+)",model="spread"\} ([0-9.e+]+)', line
        )
        if waits:
            found.setdefault("(waits)", {})[waits[1]] = float(waits[2])
    return found


def fairness(stack: Stack, lines: int) -> None:
    """One project's batch of ``lines / 2`` against another's two of ``lines / 4``."""
    gamma = stack.create_key("gamma")
    plan = [
        (stack.key_a, "alpha", lines // 2),
        (gamma, "gamma", lines // 4),
        (gamma, "gamma", lines // 4),
    ]
    batches: list[tuple[str, str, str]] = []
    for key, project, count in plan:
        with stack.client(key) as client:
            resp = client.post(
                "/v1/images/batches",
                json={
                    "model": MODEL,
                    "size": "64x64",
                    "prompts": [f"fair {project} {i}" for i in range(count)],
                },
            )
            assert resp.status_code == 200, resp.text
            batches.append((key, project, resp.json()["id"]))
    started = time.perf_counter()
    finished: dict[str, float] = {}
    half: dict[str, int] | None = None
    while len(finished) < 2:
        done = {"alpha": 0, "gamma": 0}
        open_by = {"alpha": False, "gamma": False}
        for key, project, batch_id in batches:
            with stack.client(key) as client:
                batch = client.get(f"/v1/images/batches/{batch_id}").json()
            counts = batch["request_counts"]
            done[project] += counts["completed"] + counts["failed"]
            open_by[project] |= batch["status"] not in ("completed", "failed", "cancelled")
        for project, still in open_by.items():
            if not still and project not in finished:
                finished[project] = time.perf_counter() - started
        if half is None and sum(done.values()) >= lines // 2:
            half = dict(done)
        time.sleep(0.2)
    assert half is not None
    total = sum(half.values())
    print(
        f"two projects, {lines} lines in all: alpha one batch of {lines // 2}, gamma two of "
        f"{lines // 4}"
    )
    print(
        f"  when half the lines were done: alpha {100 * half['alpha'] / total:.0f}%, gamma "
        f"{100 * half['gamma'] / total:.0f}% of them"
    )
    print(f"  alpha finished at {finished['alpha']:.1f}s, gamma at {finished['gamma']:.1f}s")


def ideal_seconds(lines: int, deployments: list[Deployment], started: float) -> float:
    """Lines over the summed limits; a deployment killed counts until it died."""
    rates = [d.per_minute / 60 for d in deployments]
    killed = [d for d in deployments if d.killed_at is not None]
    if not killed:
        return lines / sum(rates)
    dead = killed[0]
    before = dead.killed_at - started if dead.killed_at else 0.0
    done = before * sum(rates)
    if done >= lines:
        return lines / sum(rates)
    return before + (lines - done) / (sum(rates) - dead.per_minute / 60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--scale", type=int, default=10, help="limits are 60/120/180 x this")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds each upstream call")
    parser.add_argument(
        "--kill-after", type=float, default=None, help="kill the largest deployment then"
    )
    parser.add_argument("--fair", action="store_true", help="two projects' batches share")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    deployments = [Deployment(f"dep-{limit}", limit * args.scale, args.delay) for limit in LIMITS]
    model = {
        "name": MODEL,
        "capabilities": {"sizes": ["64x64"], "max_n": 4},
        "price": {"per_image": 0.01},
        "deployments": [d.entry() for d in deployments],
    }
    moto = S3Double()
    env = {
        **BENCH_ENV,
        "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "0",
        "IMAGEGEN_PROJECT_IMAGES_PER_DAY": "1000000",
    }
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="imagegen-bench-routing-")),
        moto.url,
        worker_env=env,
        api_env=env,
        extra_models=[model],
    )
    try:
        wait_http(f"{stack.base_url}/healthz")
        if args.fair:
            fairness(stack, args.lines)
            return
        idle = interactive(stack, None, 10, 0.5)
        client = openai.OpenAI(
            api_key=stack.key_a, base_url=f"{stack.base_url}/v1", max_retries=0, timeout=300
        )
        content = "\n".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/images/generations",
                    "body": {"model": MODEL, "prompt": f"bench {i}", "size": "64x64"},
                }
            )
            for i in range(args.lines)
        ).encode()
        before = deployment_metrics(stack)
        file = client.files.create(file=("bench.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        while client.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.05)
        started, wall = time.perf_counter(), time.time()
        stop = threading.Event()
        during: list[float] = []
        sampler = threading.Thread(
            target=lambda: during.extend(interactive(stack, stop, 100_000, 1.0))
        )
        sampler.start()
        while (b := client.batches.retrieve(batch.id)).status not in (
            "completed",
            "failed",
            "cancelled",
            "expired",
        ):
            due = args.kill_after is not None and time.perf_counter() - started >= args.kill_after
            if due and deployments[-1].killed_at is None:
                deployments[-1].kill()
            time.sleep(0.2)
        finished = time.perf_counter()
        stop.set()
        sampler.join()
        after = deployment_metrics(stack)
        took = finished - started
        ideal = ideal_seconds(args.lines, deployments, started)
        summed = sum(d.per_minute for d in deployments)
        print(
            f"batch of {args.lines} lines over {len(deployments)} deployments "
            f"({', '.join(str(d.per_minute) for d in deployments)} images/min, summed "
            f"{summed}), each call {args.delay}s"
        )
        if args.kill_after is not None:
            print(f"  {deployments[-1].name} killed {args.kill_after:.0f}s into the batch")
        assert b.request_counts is not None
        lines_done = finish_offsets(stack, "bench ", wall)[-1]
        print(
            f"  completed in {took:.1f}s; ideal {ideal:.1f}s; limits used "
            f"{100 * ideal / took:.1f}%; status {b.status}; lines "
            f"{b.request_counts.completed} completed, {b.request_counts.failed} failed"
        )
        print(
            f"  the last line finished {lines_done:.1f}s in ({100 * ideal / lines_done:.1f}% of "
            f"the limits used; the rest is writing the output files and polling)"
        )
        for d in deployments:
            now, then = after.get(d.name, {}), before.get(d.name, {})

            def delta(key: str, now: dict[str, float] = now, then: dict[str, float] = then) -> int:
                return int(now.get(key, 0) - then.get(key, 0))

            errors = {k: delta(k) for k in now if k not in ("ok", "cooldowns") and delta(k)}
            print(
                f"  {d.name}: {delta('ok')} calls answered, errors {errors or 'none'}, "
                f"cooldowns {delta('cooldowns')}"
            )
        waits = after.get("(waits)", {})
        print(
            f"  waits for room: {int(waits.get('in_place', 0))} in place, "
            f"{int(waits.get('queue', 0))} back to the queue"
        )
        p_idle, p_during = statistics.median(idle), statistics.median(during)
        print(
            f"  interactive (another project, 1/s): idle p50 {p_idle * 1000:.0f} ms, during "
            f"the batch p50 {p_during * 1000:.0f} ms over {len(during)} requests "
            f"(ratio {p_during / p_idle:.2f}x)"
        )
    finally:
        stack.close()
        moto.stop()
        for d in deployments:
            if d.killed_at is None:
                d.kill()


if __name__ == "__main__":
    main()
