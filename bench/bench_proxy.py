"""imagegen against LiteLLM's proxy, side by side, run by hand (issue 11's table):

    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
    .venv/bin/python -m bench.bench_proxy --litellm /tmp/litellm-venv/bin/litellm

Both serve sync ``b64_json`` 256x256 requests in front of the same fake
OpenAI-compatible upstream (instant answers). imagegen runs its full stack (Redis,
PostgreSQL, moto's S3 server in a process of its own, ``imagegen api`` and
``imagegen worker``); LiteLLM
runs its proxy alone. Rounds alternate (imagegen, LiteLLM, imagegen, ...) and the
figures are medians over rounds: throughput at concurrency 32, p50 at concurrency
1, and CPU per request of each side's own processes (imagegen: api + worker and
its consumers; LiteLLM: the proxy), from /proc. Quote medians and ratios from one
run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import yaml

from bench.bench_core import BENCH_ENV, S3Double, sync_load
from tests.support.fake_upstream import EXPECTED_KEY
from tests.support.processes import free_port, wait_http
from tests.support.stack import Stack

TICKS = os.sysconf("SC_CLK_TCK")
LITELLM_KEY = "sk-bench-" + "0" * 32
BODY = {
    "model": "fake-fast",
    "prompt": "bench proxy",
    "size": "256x256",
    "response_format": "b64_json",
}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process and all its descendants (live ones)."""
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        todo += _children(pid)
    return total


def measure(
    base_url: str, key: str, pids: list[int], requests: int, double: int | None = None
) -> dict[str, float]:
    """``double``: the S3 double's process, whose CPU is reported on its own."""
    p50_ms = sync_load(base_url, key, 1, max(50, requests // 8), BODY)["p50_ms"]
    before = sum(cpu_seconds(pid) for pid in pids)
    double_before = cpu_seconds(double) if double else 0.0
    rps = sync_load(base_url, key, 32, requests, BODY)["rps"]
    used = sum(cpu_seconds(pid) for pid in pids) - before
    figures = {"rps": rps, "p50_ms": p50_ms, "cpu_ms": used / requests * 1000}
    if double:
        figures["s3_cpu_ms"] = (cpu_seconds(double) - double_before) / requests * 1000
    return figures


def start_litellm(
    binary: str, upstream_url: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": "fake-fast",
                "litellm_params": {
                    "model": "openai/fake-fast",
                    "api_base": upstream_url,
                    "api_key": EXPECTED_KEY,
                },
            }
        ],
        "litellm_settings": {"drop_params": True},
        # Authenticated as imagegen is (a master key: no database behind it).
        "general_settings": {"master_key": LITELLM_KEY},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / "litellm.log").open("ab")
    proc = subprocess.Popen(
        [
            binary,
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health/liveliness", timeout=120)
    return proc, base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litellm", required=True, help="the litellm proxy executable")
    parser.add_argument("--requests", type=int, default=640, help="per round at concurrency 32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--storage",
        choices=("moto", "local"),
        default="moto",
        help="imagegen's image store: moto's S3 server, or the local file store",
    )
    args = parser.parse_args()
    env = {**BENCH_ENV, "IMAGEGEN_S3_BUCKET": ""} if args.storage == "local" else BENCH_ENV
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="imagegen-proxy-bench-"))
    moto = S3Double()
    (workdir / "stack").mkdir()
    stack = Stack(workdir / "stack", moto.url, worker_env=env, api_env=env)
    litellm, litellm_url = start_litellm(args.litellm, stack.upstream.base_url, workdir)
    try:
        assert stack.api.proc is not None
        assert stack.worker is not None
        assert stack.worker.proc is not None
        ours = [stack.api.proc.pid, stack.worker.proc.pid]
        results: dict[str, list[dict[str, float]]] = {"imagegen": [], "litellm": []}
        for round_ in range(args.rounds):
            results["imagegen"].append(
                measure(
                    stack.base_url,
                    stack.key_a,
                    ours,
                    args.requests,
                    moto.proc.pid if args.storage == "moto" else None,
                )
            )
            results["litellm"].append(
                measure(litellm_url, LITELLM_KEY, [litellm.pid], args.requests)
            )
            print(
                f"round {round_ + 1}: imagegen {results['imagegen'][-1]}, "
                f"litellm {results['litellm'][-1]}",
                flush=True,
            )
        med = {
            side: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            for side, rounds in results.items()
        }
        i, lite = med["imagegen"], med["litellm"]
        print("\n| | imagegen | LiteLLM proxy | ratio |\n|---|---|---|---|")
        print(
            f"| throughput at concurrency 32 | {i['rps']:.0f} rps | {lite['rps']:.0f} rps "
            f"| {i['rps'] / lite['rps']:.2f}x |"
        )
        print(
            f"| p50 at concurrency 1 | {i['p50_ms']:.1f} ms | {lite['p50_ms']:.1f} ms "
            f"| {i['p50_ms'] / lite['p50_ms']:.2f}x |"
        )
        print(
            f"| CPU per request (own processes) | {i['cpu_ms']:.1f} ms | "
            f"{lite['cpu_ms']:.1f} ms | {i['cpu_ms'] / lite['cpu_ms']:.2f}x |"
        )
        if "s3_cpu_ms" in i:
            print(f"| (the S3 double's CPU per request) | {i['s3_cpu_ms']:.1f} ms | | |")
    finally:
        litellm.terminate()
        litellm.wait(30)
        stack.close()
        moto.stop()


if __name__ == "__main__":
    main()
