"""/readyz names the dependency that is out: here the S3 bucket is missing and
Redis is down, while the liveness check still answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.stack import Stack


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    stack = Stack(
        Path(tmp_path_factory.mktemp("readiness")),
        s3_endpoint,
        api_env={"IMAGEGEN_S3_BUCKET": "no-such-bucket"},
    )
    yield stack
    stack.close()


def test_readyz_names_what_is_out_while_healthz_stays_live(broken: Stack) -> None:
    ready = httpx.get(f"{broken.base_url}/readyz", timeout=30)
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"] == "ok"
    assert checks["storage"].startswith("ClientError")
    assert "404" in checks["storage"] or "Not Found" in checks["storage"]
    broken.redis.stop()
    down = httpx.get(f"{broken.base_url}/readyz", timeout=30).json()["checks"]
    assert down["broker"].startswith("ConnectionError")
    assert httpx.get(f"{broken.base_url}/healthz", timeout=30).status_code == 200
