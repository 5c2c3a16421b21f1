"""Hosts of one test, each a Linux network namespace of its own.

A ``Network`` makes a switch (a bridge in a namespace of its own, so the root
namespace's network is never touched) and one namespace per host, joined to the
switch by a veth pair, with an address of a private subnet (``SUBNET``.0/24) and
no route anywhere else: the hosts reach each other and nothing outside. Every
name starts with ``igt<pid>x<hex>-``, so parallel runs (pytest-xdist) never clash,
and namespaces left by a killed run (their owner's pid gone, or reused since)
are removed with whatever still runs in them when the next ``Network`` starts.

A host runs processes (``Host.popen``: ``ip netns exec``, which keeps the pid)
and, in this process, code (``Host.run``, ``Host.pool``): threads that entered
the namespace with setns(2). A network namespace belongs to a thread, so
sockets those threads open (a client's connections, a server's listening
socket) live on that host, and a thread they start inherits it.

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN); ``unavailable()`` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

PREFIX = "igt"
# A private /24 unlikely to be in use; it exists only between these namespaces
# (the root namespace holds no address of it, and no host has a default route).
SUBNET = "10.213.77"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return (
            f"`ip netns add` is refused here ({made.stderr.strip()}): it needs root (or "
            "CAP_SYS_ADMIN and CAP_NET_ADMIN) and a kernel that allows network namespaces"
        )
    _ip("netns", "del", probe, check=False)
    return None


def enter(namespace: str) -> None:
    """Move the calling thread into ``namespace`` (setns(2); only this thread)."""
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _pids(namespace: str) -> list[int]:
    found = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in found.stdout.split()]


def _started_at(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), None when it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None  # exited, not yet reaped
        ticks = int(fields[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _kill_all(namespace: str) -> None:
    """SIGKILL whatever runs in ``namespace``, again until nothing does (a
    supervisor may start a child between a listing and its own kill)."""
    for _ in range(100):
        # Never this process: only threads of ours enter a host (Host.run).
        pids = [pid for pid in _pids(namespace) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove(namespace: str) -> None:
    """Kill whatever runs in ``namespace``, then delete it (and with it its
    interfaces, once its last process is gone)."""
    _kill_all(namespace)
    _ip("netns", "del", namespace, check=False)


def remove_stale() -> list[str]:
    """Delete namespaces of ours whose run is gone: the pid in the name is not
    running, or started after the namespace was made (reused)."""
    removed = []
    names = [p.name for p in NETNS_DIR.glob(f"{PREFIX}*")] if NETNS_DIR.is_dir() else []
    for name in names:
        try:
            owner = int(name[len(PREFIX) :].split("x", 1)[0])
            made = (NETNS_DIR / name).stat().st_mtime
        except (ValueError, OSError):
            continue
        started = _started_at(owner)
        if started is None or started > made + 1:
            _remove(name)
            removed.append(name)
    return removed


class Host:
    """One host: a namespace with ``eth0`` at ``address`` on the switch."""

    def __init__(self, switch: str, prefix: str, role: str, index: int) -> None:
        self.role = role
        self.namespace = f"{prefix}-{role}"
        self.address = f"{SUBNET}.{index + 2}"
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.logs: list[IO[bytes]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        _ip("netns", "add", self.namespace)
        sw, ns, port = ("-n", switch), ("-n", self.namespace), f"p{index}"
        _ip(*ns, "link", "set", "lo", "up")
        # Both ends made from inside the switch: the root namespace never holds one.
        _ip(
            *sw,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.namespace,
        )
        _ip(*sw, "link", "set", port, "master", "br0", "up")
        _ip(*ns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")

    def popen(
        self, argv: list[str], env: dict[str, str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """``argv`` on this host (``ip netns exec`` execs it: the pid is argv's)."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115  (closed with the network)
            self.logs.append(out)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads on this host, for work at once (each has entered the namespace)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    32,
                    thread_name_prefix=self.namespace,
                    initializer=enter,
                    initargs=(self.namespace,),
                )
            return self._pool

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this host (on one of its threads), its result or its error."""
        return self.pool.submit(fn).result()

    def url(self, port: int, path: str = "") -> str:
        return f"http://{self.address}:{port}{path}"

    def cut_off(self) -> None:
        """Its interface down: nothing reaches it, it reaches nothing."""
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def reconnect(self) -> None:
        _ip("-n", self.namespace, "link", "set", "eth0", "up")

    def processes(self) -> list[int]:
        return _pids(self.namespace)

    def kill(self) -> None:
        """The host dies: SIGKILL every process on it (nothing restarts them)."""
        _kill_all(self.namespace)

    def close(self) -> None:
        if self._pool is not None:
            # Its threads hold the namespace (and its interfaces) while they live.
            self._pool.shutdown(wait=True, cancel_futures=True)
        _remove(self.namespace)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # reaped: no zombie, no "still running" warning
        for log in self.logs:
            log.close()


class Network:
    """A switch and one ``Host`` per role (``network[role]``)."""

    def __init__(self, roles: list[str]) -> None:
        remove_stale()
        self.prefix = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-switch"
        self.hosts: dict[str, Host] = {}
        _ip("netns", "add", self.switch)
        try:
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for index, role in enumerate(roles):
                self.hosts[role] = Host(self.switch, self.prefix, role, index)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        # A host whose wiring failed half way is not in ``hosts``: its name is ours.
        for leftover in NETNS_DIR.glob(f"{self.prefix}-*"):
            _remove(leftover.name)
