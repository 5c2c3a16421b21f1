"""What hostile input costs `imagegen dev` (issue 24's cases), run by hand:

    .venv/bin/python -m bench.bench_hostile                       # this tree
    .venv/bin/python -m bench.bench_hostile --root /tmp/before    # another checkout

`--root` names a checkout whose own .venv runs `imagegen dev` (so an older commit
is measured with the same cases, side by side). Each case reports its answer and
the peak RSS growth (VmHWM) of the API process (`imagegen dev` serves it) and of
its worker. Only this machine's loopback is addressed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.support.bombs import png_declaring
from tests.support.processes import free_port, live_processes

KEY = "sk-ig-bench-hostile"
FORM = "multipart/form-data; boundary=b"
MiB = 2**20


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Dev:
    def __init__(self, root: Path, home: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        models = home / "models.yaml"
        models.write_text(
            "models:\n"
            "  - {name: procedural, provider: procedural, capabilities: "
            "{sizes: [64x64, 1024x1024], max_n: 4, edits: true, variations: true}}\n"
            "  - {name: parked, provider: procedural, queue: parked, capabilities: "
            "{sizes: [64x64]}}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
        env |= {
            "IMAGEGEN_PORT": str(self.port),
            "IMAGEGEN_DEV_API_KEY": KEY,
            "IMAGEGEN_MODELS_FILE": str(models),
        }
        self.proc = subprocess.Popen(
            [str(root / ".venv" / "bin" / "imagegen"), "dev"],
            cwd=home,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        self.worker = next(
            pid
            for pid, ppid, argv, _ in live_processes()
            if ppid == self.proc.pid and argv[1:3] == ["-m", "worker"]
        )

    def hwm(self) -> tuple[int, int]:
        return _status_kib(self.proc.pid, "VmHWM"), _status_kib(self.worker, "VmHWM")

    def reset_peaks(self) -> None:
        """VmHWM starts again from the current RSS (Linux's clear_refs, value 5)."""
        for pid in (self.proc.pid, self.worker):
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _raw(dev: Dev, head: str) -> str:
    with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
        sock.sendall(head.encode())
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return "no answer in 10 s: the server waits for the body"
    return data.split(b"\r\n", 1)[0].decode()


def _stream(chunks: Iterator[bytes], dev: Dev, path: str, ctype: str, key: bool | str) -> str:
    """``key``: the dev key (True), none (False), or this one."""
    headers = {"Content-Type": ctype}
    if key:
        headers["Authorization"] = f"Bearer {KEY if key is True else key}"
    try:
        resp = httpx.post(f"{dev.base}{path}", content=chunks, headers=headers, timeout=300)
        return f"{resp.status_code} {resp.text[:90]}"
    except httpx.HTTPError as exc:
        return f"connection closed ({type(exc).__name__})"


def case_json_declared(dev: Dev) -> str:
    return _raw(
        dev,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {300 * MiB}\r\n\r\n",
    )


def _json_300mib() -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(300):
        yield b"a" * MiB
    yield b'"}'


def case_json_chunked(dev: Dev) -> str:
    return _stream(_json_300mib(), dev, "/v1/images/generations", "application/json", key=False)


def case_json_wrong_key(dev: Dev) -> str:
    return _stream(
        _json_300mib(), dev, "/v1/images/generations", "application/json", key="sk-wrong"
    )


def _multipart(files: list[tuple[str, Iterator[bytes]]]) -> Iterator[bytes]:
    yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhat\r\n'
    for name, content in files:
        yield (
            f'--b\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        yield from content
        yield b"\r\n"
    yield b"--b--\r\n"


def case_edit_400mib(dev: Dev) -> str:
    big = (b"\x89PNG\r\n\x1a\n" + b"\0" * (MiB - 8) if i == 0 else b"\0" * MiB for i in range(400))
    return _stream(
        _multipart([("image", big)]),
        dev,
        "/v1/images/edits",
        "multipart/form-data; boundary=b",
        True,
    )


def case_edit_bombs(dev: Dev) -> str:
    bomb = png_declaring(13000, 13000, complete=True)
    files = [("image[]", iter([bomb])) for _ in range(3)]
    return _stream(_multipart(files), dev, "/v1/images/edits", FORM, True)


def case_batch_3m_lines(dev: Dev) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=dev.base, headers=headers, timeout=300) as client:
        file = client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("b.jsonl", b"{}\n" * 3_000_000, "application/jsonl")},
        ).json()
        start = time.monotonic()
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": file["id"],
                "endpoint": "/v1/images/generations",
                "completion_window": "24h",
            },
        ).json()
        while batch["status"] == "validating" and time.monotonic() - start < 300:
            time.sleep(0.5)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
    errors = batch.get("errors") or {}
    listed = len(errors.get("data", []))
    return f"{batch['status']} in {time.monotonic() - start:.1f} s, {listed} errors listed"


def case_300_streams(dev: Dev) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    job = httpx.post(
        f"{dev.base}/v1/images/generations",
        json={"model": "parked", "prompt": "p", "size": "64x64"},
        headers={**headers, "Prefer": "respond-async"},
        timeout=30,
    ).json()

    def open_streams(count: int) -> list[socket.socket]:
        socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", dev.port), timeout=30)
            sock.sendall(
                f"GET /v1/images/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {KEY}\r\n\r\n".encode()
            )
            socks.append(sock)
        return socks

    # 100 first (within the per-key cap, where it has one), measured; then 200 more.
    socks = open_streams(100)
    time.sleep(2)
    cpu0, t0 = _cpu_seconds(dev.proc.pid), time.monotonic()
    lat = []
    for _ in range(20):
        start = time.monotonic()
        httpx.get(f"{dev.base}/healthz", timeout=30)
        lat.append(time.monotonic() - start)
        time.sleep(0.2)
    busy = (_cpu_seconds(dev.proc.pid) - cpu0) / (time.monotonic() - t0)
    socks += open_streams(200)
    time.sleep(2)
    refused = sum(1 for s in socks if s.recv(12).startswith(b"HTTP/1.1 429"))
    for sock in socks:
        sock.close()
    lat.sort()
    return (
        f"100 streams: API CPU {busy:.0%} of a core, /healthz p50 "
        f"{lat[len(lat) // 2] * 1000:.0f} ms; 200 more: {refused} refused 429"
    )


CASES: list[tuple[str, Callable[[Dev], str]]] = [
    ("300 MiB JSON, no key, declared length", case_json_declared),
    ("300 MiB JSON, no key, chunked", case_json_chunked),
    ("300 MiB JSON, a wrong key, chunked", case_json_wrong_key),
    ("400 MiB image on /v1/images/edits", case_edit_400mib),
    ("three 13000x13000 PNG bombs in one edit", case_edit_bombs),
    ("batch file of 3,000,000 lines of {}", case_batch_3m_lines),
    ("SSE streams on one queued job", case_300_streams),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--case", action="append", help="only cases whose name holds this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        dev = Dev(args.root.resolve(), Path(home))
        try:
            for name, case in CASES:
                if args.case and not any(part in name for part in args.case):
                    continue
                dev.reset_peaks()
                api0, worker0 = dev.hwm()
                answer = case(dev)
                time.sleep(1)
                api1, worker1 = dev.hwm()
                print(
                    json.dumps(
                        {
                            "case": name,
                            "answer": answer,
                            "api_peak_growth_mib": round((api1 - api0) / 1024),
                            "worker_peak_growth_mib": round((worker1 - worker0) / 1024),
                        }
                    ),
                    flush=True,
                )
        finally:
            dev.stop()


if __name__ == "__main__":
    main()
