"""Deleting and listing stored objects (issue 29: retention, deletion on demand and
orphans all go through these): S3 over moto's HTTP server, and local files."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import boto3
import pytest

from shared.core.errors import StorageUnavailable
from shared.core.settings import Settings
from shared.core.storage import DELETE_BATCH, LocalStorage, S3Storage, Storage


@pytest.fixture(params=["s3", "local"])
def storage(
    request: pytest.FixtureRequest,
    s3_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "files", "secret")
        return
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = f"delete-{uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    yield S3Storage(Settings(s3_bucket=bucket, s3_endpoint_url=s3_endpoint))


def keys(storage: Storage, prefix: str = "") -> set[str]:
    return {obj.key for obj in storage.scan(prefix)}


def test_scan_lists_what_is_stored_with_size_and_age(storage: Storage) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    storage.put("p1/job1/0.png", b"x" * 10, "image/png")
    storage.put("p1/job1/input-0.png", b"y" * 3, "image/png")
    storage.put("p1/job2/0.png", b"z", "image/png")
    storage.put("p2/job3/0.png", b"w" * 7, "image/png")

    found = {obj.key: obj for obj in storage.scan("p1/")}
    assert set(found) == {"p1/job1/0.png", "p1/job1/input-0.png", "p1/job2/0.png"}
    assert found["p1/job1/0.png"].size == 10
    assert all(
        before <= obj.modified <= datetime.now(UTC) + timedelta(seconds=5) for obj in found.values()
    )
    assert keys(storage, "p1/job1/") == {"p1/job1/0.png", "p1/job1/input-0.png"}
    assert keys(storage, "p3/") == set()
    assert len(keys(storage)) == 4


# '-' sorts before '/': a folder walk in name order would put p/a/ first.
ORDERED = ["p/a-b/0.png", "p/a/0.png", "p/a/10.png", "p/a/2.png", "p/a0/0.png", "p/b"]


def test_scan_is_in_key_order_and_resumes_after_a_key(storage: Storage) -> None:
    """Both stores list in S3's (byte) order, so a scan resumed after the last key
    seen (the orphan sweep's cursor) misses nothing and repeats nothing."""
    for key in reversed(ORDERED):
        storage.put(key, b"x", "image/png")
    storage.put("q/0.png", b"x", "image/png")
    assert [o.key for o in storage.scan("p/")] == ORDERED
    assert [o.key for o in storage.scan("p/", start_after="p/a/10.png")] == ORDERED[3:]
    assert [o.key for o in storage.scan("p/", start_after="p/a/")] == ORDERED[1:]
    assert [o.key for o in storage.scan("p/", start_after="o")] == ORDERED
    assert [o.key for o in storage.scan("p/", start_after="p/b")] == []
    assert [o.key for o in storage.scan("", start_after="p/a0/0.png")] == ["p/b", "q/0.png"]


def test_delete_removes_only_the_keys_named_and_missing_ones_are_no_error(
    storage: Storage,
) -> None:
    for i in range(3):
        storage.put(f"p/job/{i}.png", b"img", "image/png")
    storage.put("p/other/0.png", b"img", "image/png")

    storage.delete(["p/job/0.png", "p/job/1.png", "p/job/never-was.png"])

    assert keys(storage, "p/") == {"p/job/2.png", "p/other/0.png"}
    storage.delete(["p/job/0.png"])  # twice: a resumed purge
    assert keys(storage, "p/") == {"p/job/2.png", "p/other/0.png"}


def test_s3_deletes_in_calls_of_a_thousand(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = f"delete-{uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage = S3Storage(Settings(s3_bucket=bucket, s3_endpoint_url=s3_endpoint))
    names = [f"p/j/{i}.png" for i in range(DELETE_BATCH + 5)]
    for name in names[:3] + names[-3:]:
        storage.put(name, b"img", "image/png")

    assert storage.delete(names) == 2

    assert keys(storage) == set()


def test_s3_out_is_storage_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # A port nothing listens on (this machine's loopback only).
    storage = S3Storage(Settings(s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9"))
    storage.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StorageUnavailable):
        storage.delete(["p/j/0.png"])
    with pytest.raises(StorageUnavailable):
        list(storage.scan("p/"))
