"""The purge's fleet-wide lease in Redis (a real redis-server): one pass at a time,
and a pass that outlived its lease releases only its own, never the lease of the
pass that took over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from shared.retention import periodic
from shared.retention.orphans import Swept
from shared.retention.purge import Purged
from tests.support.processes import RedisServer


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = RedisServer(Path(tmp_path_factory.mktemp("purge-redis"))).start()
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


@pytest.fixture
def passes(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``run_purge`` on this Redis, each pass's work replaced by what the test puts
    in the returned list (called inside the pass)."""
    client.delete(periodic.RUNNING_KEY)
    during: list[Any] = []
    monkeypatch.setattr(periodic, "current", lambda: SimpleNamespace(redis=client))
    monkeypatch.setattr(periodic, "get_storage", lambda: None)

    def purge_once(*_: Any, **__: Any) -> Purged:
        for step in during:
            step()
        return Purged()

    monkeypatch.setattr(periodic, "purge_once", purge_once)
    monkeypatch.setattr(periodic, "sweep_orphans", lambda *_, **__: Swept())
    return during


def test_one_pass_at_a_time_and_the_lease_released_after(
    client: redis.Redis, passes: list[Any]
) -> None:
    seen: list[object] = []
    passes.append(lambda: seen.append(periodic.run_purge()))  # a second pass meanwhile
    assert periodic.run_purge() is not None
    assert seen == [None]
    assert client.get(periodic.RUNNING_KEY) is None


def test_a_pass_that_outlived_its_lease_leaves_the_next_ones(
    client: redis.Redis, passes: list[Any]
) -> None:
    # Its lease expires mid-pass and another pass takes it.
    passes.append(lambda: client.set(periodic.RUNNING_KEY, b"the-next-pass"))
    assert periodic.run_purge() is not None
    assert client.get(periodic.RUNNING_KEY) == b"the-next-pass"
