from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from tests.support.processes import free_port
from tests.support.stack import Stack

# pytest-xdist's two workers (pyproject's addopts) take whole modules in collection
# order (--dist loadfile: a module's own stack is built once), so the longest
# modules go first and the short ones fill in at the end, letting both workers
# finish together. Seconds on a 2-core machine from --durations; a module not
# listed counts as short and keeps its place.
LONGEST_MODULES = {
    "tests/e2e/test_faults.py": 80,
    "tests/e2e/test_resilience.py": 70,
    "tests/e2e/test_local_models.py": 60,
    "tests/e2e/test_openai_schema.py": 45,
    "tests/e2e/test_webhooks.py": 42,
    "tests/e2e/test_embedded.py": 38,
    "tests/e2e/test_batches.py": 33,
    "tests/e2e/test_hosts.py": 30,
    "tests/e2e/test_rabbitmq.py": 30,
    "tests/e2e/test_keys_and_limits.py": 24,
    "tests/e2e/test_console.py": 18,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_MODULES.get(item.nodeid.split("::")[0], 0))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 API on loopback (moto), reached over real HTTP by the API and worker."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    """The shared deployment most tests use; tests that break things make their own."""
    s = Stack(Path(tmp_path_factory.mktemp("stack")), s3_endpoint)
    yield s
    s.close()
