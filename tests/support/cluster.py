"""The service deployed over several hosts (tests/support/netns.py): one data
host (Redis, a PostgreSQL cluster of its own, S3 by moto, the fake upstream),
API hosts, worker hosts of the I/O queue, one host for the batch and webhook
queues, and a client host. Every process listens on its host's address, never
on loopback, so whatever crosses hosts crosses the switch.

What a deployment on several hosts shares is only what it shares over the
network: each host has its own data dir (``IMAGEGEN_DATA_DIR``), nothing on a
file system is common to two hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from moto.server import ThreadedMotoServer

from tests.support.fake_upstream import EXPECTED_KEY, FakeUpstream
from tests.support.netns import SUBNET, Host, Network
from tests.support.processes import wait_for
from tests.support.stack import FINISHED, models_yaml

API_PORT = 8000
REDIS_PORT = 6379
PG_PORT = 5432
S3_PORT = 9000
UPSTREAM_PORT = 8080
# The data host is the network's first: its address, and the in-process fake
# upstream's base URL, are known before it starts (for extra models' entries).
DATA_ADDRESS = f"{SUBNET}.2"
UPSTREAM_URL = f"http://{DATA_ADDRESS}:{UPSTREAM_PORT}/v1"
BUCKET = "imagegen-hosts"
# moto's S3 app on the data host's address, in a process of its own (as
# bench/bench_core.py's S3Double), quiet: a line per request costs CPU.
S3_SERVER = f"""
import logging, sys
from moto.server import create_backend_app
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.WARNING)
make_server(sys.argv[1], {S3_PORT}, create_backend_app("s3"), threaded=True).serve_forever()
"""


class Cluster:
    """The hosts and the service on them; ``close()`` removes everything."""

    def __init__(
        self,
        workdir: Path,
        *,
        apis: Sequence[str] = ("api1", "api2"),
        workers: Sequence[str] = ("work1", "work2"),
        env: dict[str, str] | None = None,
        worker_args: Sequence[str] = (),
        upstream: Callable[[Host], str] | None = None,
        s3_in_process: bool = True,
        extra_models: Sequence[dict[str, Any]] = (),
    ) -> None:
        """``upstream``: starts the fake upstream on the data host and answers its
        base URL (default: a ``FakeUpstream`` in this process, as ``self.upstream``).
        ``s3_in_process``: moto's server on a thread of this process (a Python start
        fewer: the test's hosts start on two cores), else in a process of its own
        (a benchmark's load would take this process's GIL)."""
        self.s3_in_process = s3_in_process
        self.extra_models = list(extra_models)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.api_roles = list(apis)
        self.worker_roles = list(workers)
        self.network = Network(["data", *apis, *workers, "batch", "client"])
        self.pg_home: Path | None = None
        self.upstream: FakeUpstream | None = None
        self._s3: ThreadedMotoServer | None = None
        try:
            self._start(env or {}, list(worker_args), upstream)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, role: str) -> Host:
        return self.network[role]

    @property
    def data(self) -> Host:
        return self.network["data"]

    @property
    def client(self) -> Host:
        return self.network["client"]

    def _start(
        self,
        extra_env: dict[str, str],
        worker_args: list[str],
        upstream: Callable[[Host], str] | None,
    ) -> None:
        data = self.data
        data.popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                *("--port", str(REDIS_PORT), "--bind", data.address, "--save", ""),
                # Other hosts connect: protected mode answers only loopback.
                *("--protected-mode", "no"),
                *("--appendonly", "no", "--dir", str(self.workdir)),
            ],
            dict(os.environ),
        )
        if self.s3_in_process:
            self._s3 = ThreadedMotoServer(ip_address=data.address, port=S3_PORT, verbose=False)
            data.run(self._s3.start)  # its thread, started from the data host, is there
        else:
            data.popen([sys.executable, "-c", S3_SERVER, data.address], dict(os.environ))
        self._postgres()
        if upstream is None:
            self.upstream = data.run(
                lambda: FakeUpstream(port=UPSTREAM_PORT, host=data.address).start()
            )
            upstream_url = self.upstream.base_url
            assert upstream_url == UPSTREAM_URL, upstream_url
        else:
            upstream_url = upstream(data)
        models_file = self.workdir / "models.yaml"
        models = models_yaml(upstream_url)
        models["models"] += self.extra_models
        models_file.write_text(yaml.safe_dump(models))
        self.database_url = f"postgresql+psycopg://postgres@{data.address}:{PG_PORT}/imagegen"
        self.env = {
            **os.environ,
            "IMAGEGEN_DATABASE_URL": self.database_url,
            "IMAGEGEN_BROKER_URL": f"redis://{data.address}:{REDIS_PORT}/0",
            "IMAGEGEN_REDIS_URL": f"redis://{data.address}:{REDIS_PORT}/0",
            "IMAGEGEN_S3_ENDPOINT_URL": data.url(S3_PORT),
            "IMAGEGEN_S3_BUCKET": BUCKET,
            "IMAGEGEN_MODELS_FILE": str(models_file),
            "IMAGEGEN_PORT": str(API_PORT),
            # Every host must sign alike (local file links, any host's answer).
            "IMAGEGEN_SECRET_KEY": "test-secret",
            "IMAGEGEN_PROVIDER_TIMEOUT_SECONDS": "10",
            "IMAGEGEN_PROVIDER_MAX_ATTEMPTS": "3",
            "IMAGEGEN_PROVIDER_BACKOFF_SECONDS": "0.2",
            "IMAGEGEN_JOB_LEASE_SECONDS": "3",
            "IMAGEGEN_SWEEP_INTERVAL_SECONDS": "0.5",
            "IMAGEGEN_REDELIVER_AFTER_SECONDS": "4",
            "IMAGEGEN_SYNC_WAIT_SECONDS": "60",
            "IMAGEGEN_CLIENT_TIMEOUT_SECONDS": "5",
            "IMAGEGEN_ADMIN_API_KEY": "sk-admin-test",
            # The webhook receiver is on the client host, at a private address of
            # the test subnet: allowed the way loopback receivers are elsewhere.
            "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
            "IMAGEGEN_WEBHOOK_RETRY_SCHEDULE": "[0, 1, 1, 1, 1]",
            "IMAGEGEN_WEBHOOK_TIMEOUT_SECONDS": "3",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "FAKE_UPSTREAM_KEY": EXPECTED_KEY,
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.env.pop("OPENAI_API_KEY", None)
        wait_for(lambda: self._reaches(data, REDIS_PORT), 20, "redis on the data host")
        migrate = data.popen(
            [sys.executable, "-m", "cli", "migrate"],
            self.host_env(data),
            self.workdir / "migrate.log",
        )
        wait_for(lambda: self._reaches(data, S3_PORT), 30, "S3 on the data host")
        data.run(self._make_bucket)
        assert migrate.wait(60) == 0, (self.workdir / "migrate.log").read_text()
        self.key = data.run(lambda: self._create_key("alpha"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        for role in self.api_roles:
            self.start_api(role)
        for role in self.worker_roles:
            self.start_worker(role, ["--queues", "default", *worker_args])
        # One consumer for both (not the batch queue's own, niced child): a Python
        # start fewer, and no batch here is big enough to slow webhooks.
        self.start_worker(
            "batch", ["--queues", "batch,webhooks"], {"IMAGEGEN_WORKER_SPLIT_BATCH": "false"}
        )
        for role in self.api_roles:
            wait_for(lambda r=role: self._healthy(r), 60, f"the API on {role}")

    def _healthy(self, role: str) -> bool:
        """The API on ``role`` answers /healthz; one that exited fails at once, with
        its log's last lines."""
        if self.processes[role].poll() is not None:
            tail = "\n".join(self.log(role).splitlines()[-5:])
            raise RuntimeError(f"the API on {role} exited:\n{tail}")
        return self._answers(role)

    def _postgres(self) -> None:
        """A cluster of the data host's own: initdb as postgres in a temporary
        folder, listening on the host's address, trusting the test subnet."""
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        bin_dir = found[-1].parent if found else Path(shutil.which("initdb") or "").parent
        self.pg_home = Path(tempfile.mkdtemp(prefix="imagegen-hosts-pg-"))
        pgdata = self.pg_home / "pgdata"
        pgdata.mkdir()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(self.pg_home, "postgres")
            shutil.chown(pgdata, "postgres")

        def run(*argv: str, host: list[str] | None = None) -> None:
            done = subprocess.run(
                [*(host or []), *as_postgres, *argv],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr

        run(
            str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust", "--no-sync"
        )
        with open(pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        options = (
            f"-p {PG_PORT} -k {pgdata} -c listen_addresses={self.data.address} "
            "-c fsync=off -c synchronous_commit=off -c max_connections=400"
        )
        # pg_ctl starts the server on the data host and returns once it answers.
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-w", "-l", str(pgdata / "log")]
        run(*pg_ctl, "-o", options, "start", host=["ip", "netns", "exec", self.data.namespace])
        admin = f"postgresql://postgres@{self.data.address}:{PG_PORT}/postgres"

        def create() -> None:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("CREATE DATABASE imagegen")

        self.data.run(create)

    def host_env(self, host: Host) -> dict[str, str]:
        data_dir = self.workdir / host.role
        data_dir.mkdir(exist_ok=True)
        return {**self.env, "IMAGEGEN_DATA_DIR": str(data_dir), "IMAGEGEN_HOST": host.address}

    def start_api(self, role: str) -> subprocess.Popen[bytes]:
        host = self.network[role]
        proc = host.popen(
            [sys.executable, "-m", "cli", "api"], self.host_env(host), self.workdir / f"{role}.log"
        )
        self.processes[role] = proc
        return proc

    def start_worker(
        self, role: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        host = self.network[role]
        proc = host.popen(
            [sys.executable, "-m", "cli", "worker", *args],
            {**self.host_env(host), **(env or {})},
            self.workdir / f"{role}.log",
        )
        self.processes[role] = proc
        return proc

    def log(self, role: str) -> str:
        return (self.workdir / f"{role}.log").read_text(errors="replace")

    def api_url(self, role: str) -> str:
        return self.network[role].url(API_PORT)

    def _answers(self, role: str) -> bool:
        def get() -> bool:
            try:
                return httpx.get(f"{self.api_url(role)}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        return self.client.run(get)

    def _reaches(self, host: Host, port: int) -> bool:
        import socket

        def connect() -> bool:
            try:
                socket.create_connection((host.address, port), timeout=0.5).close()
                return True
            except OSError:
                return False

        return self.client.run(connect)

    def _make_bucket(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.env["IMAGEGEN_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            s3.create_bucket(Bucket=BUCKET)
        finally:
            s3.close()

    def _create_key(self, project: str) -> str:
        """A key written with the service's own code (as tests/support/stack.py)."""
        import sqlalchemy as sa
        from sqlmodel import Session

        from shared.projects.service import create_key

        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with Session(engine) as session, session.begin():
                _key, plaintext = create_key(session, project)
        finally:
            engine.dispose()
        return plaintext

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Rows of ``sql`` on the data host's database (run from the data host)."""
        import sqlalchemy as sa

        def run() -> list[Any]:
            engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
            try:
                with engine.begin() as conn:
                    result = conn.execute(sa.text(sql), params)
                    return list(result.all()) if result.returns_rows else []
            finally:
                engine.dispose()

        return self.data.run(run)

    def http(self, role: str, timeout: float = 30) -> httpx.Client:
        """A client of the API on ``role``; use it on the client host only
        (``cluster.client.run``): its connections open in the calling thread."""
        return httpx.Client(
            base_url=self.api_url(role),
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.key}"},
        )

    def finished(self, ids: Sequence[str]) -> bool:
        rows = self.query("SELECT status FROM job WHERE id = ANY(:ids)", ids=list(ids))
        return len(rows) == len(ids) and all(r[0] in FINISHED for r in rows)

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
        if self._s3 is not None:
            self._s3.stop()
        self.network.close()  # every process on every host, PostgreSQL's included
        if self.pg_home is not None:
            shutil.rmtree(self.pg_home, ignore_errors=True)
