"""A RabbitMQ node owned by the test: Debian's ``rabbitmq-server`` on free loopback
ports, with its own node name, Erlang port mapper (epmd), configuration, database
and logs under a folder of its own, so that it can be stopped and started again
without touching any other node on the machine (a system one on 5672 included).

A node takes about 5 s to start: a test module shares one (tests/e2e/test_rabbitmq.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.support.processes import free_port, wait_for

# The package's own start script runs the node as the calling user; /usr/sbin's
# wrapper would switch to the rabbitmq user, which cannot write a test's folder.
SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
MISSING = (
    "rabbitmq-server is not installed: the RabbitMQ tests need Debian's package "
    "(`apt-get install rabbitmq-server`; .ci/run installs it)"
)


def installed() -> bool:
    return SCRIPT.exists()


class RabbitMQServer:
    """One node: ``start`` boots it (or boots it again, keeping its durable queues and
    persistent messages, as a restarted broker does), ``stop`` shuts it down cleanly
    (SIGTERM: connections are closed, as in a broker restart), ``remove`` stops it
    for good and deletes its folder."""

    def __init__(self, workdir: Path, config: dict[str, str] | None = None) -> None:
        if not installed():
            raise RuntimeError(MISSING)
        self.home = workdir / "rabbitmq"
        self.port = free_port()
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self.nodename = f"imagegen-test-{self.port}@localhost"
        self.home.mkdir(parents=True, exist_ok=True)
        # One listener, RABBITMQ_NODE_IP_ADDRESS:RABBITMQ_NODE_PORT below; no plugins,
        # so no management port either.
        (self.home / "rabbitmq.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in (config or {}).items())
        )
        (self.home / "enabled_plugins").write_text("[].\n")
        # An empty env file: the system's /etc/rabbitmq/rabbitmq-env.conf names the
        # system node (and its port) and must not apply here.
        (self.home / "rabbitmq-env.conf").write_text("")
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),  # the Erlang cookie is written here
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.epmd: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, wait: bool = True) -> RabbitMQServer:
        """Boot the node; ``wait=False`` returns at once (``wait_ready`` later), so
        that a test can build the rest of its stack meanwhile."""
        if self.epmd is None:
            # Our own port mapper, in the foreground: the node would otherwise start
            # a daemon that outlives the test.
            epmd = shutil.which("epmd") or "epmd"
            self.epmd = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # Listening before the node looks for it, or the node starts a daemon.
            wait_for(lambda: _listens(self.epmd_port), 10, "epmd")
        with open(self.home / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [str(SCRIPT)], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self.wait_ready() if wait else self

    def wait_ready(self, timeout: float = 60) -> RabbitMQServer:
        wait_for(self._answers, timeout, f"RabbitMQ on port {self.port} ({self.home})")
        return self

    def _answers(self) -> bool:
        """The node speaks AMQP: it answers a protocol header with Connection.Start
        (a frame of type 1), only once it has fully booted."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.home / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"rabbitmq-server exited ({self.proc.returncode}):\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(1) == b"\x01"
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.home, ignore_errors=True)


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
