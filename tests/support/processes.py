"""Real servers for the tests: a Redis of our own, PostgreSQL databases, and the
service's own API and worker as separate processes talking real HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO

import httpx
import psycopg
from werkzeug.serving import BaseWSGIServer, make_server

PG_ADMIN_URL = os.environ.get(
    "IMAGEGEN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class RedisServer:
    """A redis-server owned by the test, so it can be stopped and restarted."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._ping, 10, "redis")
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def create_database(admin_url: str = PG_ADMIN_URL) -> str:
    name = f"imagegen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresCluster:
    """A PostgreSQL cluster of the test's own (initdb in a temporary folder, on a free
    port), so that it can be stopped and started without touching anyone else's."""

    def __init__(self) -> None:
        # Its own folder under the system's temporary directory: pytest's is private to
        # root, and the server runs as the postgres user.
        self.home = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))
        self.dir = self.home / "pgdata"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        self.bin = found[-1].parent if found else Path(shutil.which("initdb") or "").parent
        # PostgreSQL refuses to run as root: as root, run it as the postgres user.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> PostgresCluster:
        self.dir.mkdir()
        if self.prefix:
            shutil.chown(self.home, "postgres")
            shutil.chown(self.dir, "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        )
        return self.start()

    def start(self) -> PostgresCluster:
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir),
            "-w",
            "-l",
            str(self.dir / "server.log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        return self

    def stop(self) -> None:
        """Fast shutdown: connections are cut, as in an outage."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


class ServiceProcess:
    """``imagegen api`` or ``imagegen worker`` in its own process."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.args = args
        self.cwd = cwd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (open while the process runs; closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no acks, no cleanup."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_http(url: str, timeout: float = 30) -> None:
    def ok() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout, url)


class S3Server:
    """moto's S3 app on a loopback port that can be stopped (socket closed, so
    clients are refused, as with a real outage) and started again on the same
    port; moto keeps its buckets in this process meanwhile."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server: BaseWSGIServer | None = None

    def start(self) -> S3Server:
        from moto.server import create_backend_app  # type: ignore[attr-defined]

        self._server = make_server("127.0.0.1", self.port, create_backend_app("s3"), threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def live_processes() -> list[tuple[int, int, list[str], str]]:
    """(pid, parent pid, argv, cwd) of every process not yet exited (zombies left
    out), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append((int(entry), int(ppid), argv, cwd))
    return found


def imagegen_workers(*, parent: int | None = None, cwd: Path | None = None) -> list[int]:
    """Live consumer processes (``python -m worker``, started by ``imagegen worker`` or
    ``imagegen dev``), by parent or working directory."""
    return [
        pid
        for pid, ppid, argv, wd in live_processes()
        if argv[1:3] == ["-m", "worker"]
        and (parent is None or ppid == parent)
        and (cwd is None or wd == str(cwd))
    ]


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
