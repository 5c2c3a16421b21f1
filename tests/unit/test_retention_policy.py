"""The rules of how long things live (shared/retention/policy.py) and which keys
the orphan sweep may judge (shared/retention/orphans.py): pure logic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.core.errors import InvalidRequest
from shared.core.storage import StoredObject
from shared.retention.orphans import _shapes
from shared.retention.policy import (
    file_expires_after,
    file_expires_at,
    image_ends_at,
    parse_retention,
    request_image_life,
    url_life,
)
from shared.retention.purge import job_object_keys

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_requests_image_life_is_capped_at_the_projects_retention() -> None:
    assert request_image_life(None, 3600) is None
    assert request_image_life("10m", None) == 600
    assert request_image_life("10m", 3600) == 600
    assert request_image_life("48h", 3600) == 3600  # capped, not refused
    assert request_image_life("120", None) == 120
    for bad in ("soon", "30s", "-5m", ""):
        with pytest.raises(InvalidRequest) as caught:
            request_image_life(bad, None)
        assert caught.value.param == "Image-Expires-After"


def test_an_image_ends_at_the_earlier_of_its_jobs_life_and_its_retention() -> None:
    made = NOW - timedelta(minutes=30)
    assert image_ends_at(None, made, None) is None
    assert image_ends_at(NOW, made, None) == NOW
    assert image_ends_at(None, made, 3600) == made + timedelta(hours=1)
    assert image_ends_at(NOW + timedelta(days=1), made, 3600) == made + timedelta(hours=1)


def test_a_url_never_outlives_its_image() -> None:
    assert url_life(None, NOW, 3600) == 3600
    assert url_life(NOW + timedelta(minutes=10), NOW, 3600) == 600
    assert url_life(NOW + timedelta(days=2), NOW, 3600) == 3600
    assert url_life(NOW + timedelta(milliseconds=200), NOW, 3600) == 1


def test_files_expires_after_as_openai_takes_it() -> None:
    assert file_expires_after(None, None) is None
    assert file_expires_after("created_at", "3600") == 3600
    assert file_expires_after("created_at", "2592000") == 2592000
    for anchor, seconds, param in (
        ("created_at", "3599", "expires_after.seconds"),
        ("created_at", "2592001", "expires_after.seconds"),
        ("created_at", "an hour", "expires_after.seconds"),
        ("created_at", None, "expires_after.seconds"),
        ("last_active_at", "3600", "expires_after.anchor"),
        (None, "3600", "expires_after.anchor"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            file_expires_after(anchor, seconds)
        assert caught.value.param == param
    assert file_expires_at(NOW, None, None) is None
    assert file_expires_at(NOW, 7200, 3600) == NOW + timedelta(hours=1)
    assert file_expires_at(NOW, 7200, None) == NOW + timedelta(hours=2)


def test_retention_as_an_operator_writes_it() -> None:
    assert parse_retention("30d", what="--images") == 30 * 86400
    assert parse_retention("7d12h", what="--images") == 7 * 86400 + 12 * 3600
    assert parse_retention("90m", what="--images") == 5400
    assert parse_retention("3600", what="--images") == 3600
    assert parse_retention("forever", what="--images") is None
    for bad in ("30s", "1y", "d", "100000d"):
        with pytest.raises(InvalidRequest) as caught:
            parse_retention(bad, what="--jobs")
        assert "--jobs" in str(caught.value)


def test_a_jobs_other_objects_are_its_inputs_and_kept_images() -> None:
    request = {"images": ["p/j/input-0.png", "p/j/input-1.webp"], "mask": "p/j/mask.png"}
    upstream = {"m/d/0": {"kept": ["p/j/upstream/m-0"]}, "m/d/1": {"id": "x"}}
    assert job_object_keys(request, upstream) == [
        "p/j/input-0.png",
        "p/j/input-1.webp",
        "p/j/mask.png",
        "p/j/upstream/m-0",
    ]
    assert job_object_keys({"prompt": "x"}, None) == []


def test_the_orphan_sweep_judges_only_key_shapes_it_makes() -> None:
    def obj(key: str) -> StoredObject:
        return StoredObject(key, 1, NOW)

    shapes = _shapes(
        [
            obj("p/job_1/0.png"),
            obj("p/job_1/input-0.png"),
            obj("p/job_1/mask.png"),
            obj("p/job_1/upstream/k-0"),
            obj("p/files/file_1"),
            obj("p/job_1/0.png.tmp"),
            obj("p/notes.txt"),
            obj("p/job_1/thumbs/0.png"),
        ]
    )
    assert shapes.images == {("job_1", 0): "p/job_1/0.png"}
    assert shapes.jobs == {
        "job_1": ["p/job_1/input-0.png", "p/job_1/mask.png", "p/job_1/upstream/k-0"]
    }
    assert shapes.files == {"file_1": "p/files/file_1"}
    # Not ours to judge: left alone. The .tmp is in none (never owned).
    assert shapes.unknown == {"p/notes.txt", "p/job_1/thumbs/0.png"}


def test_the_sweeper_publishes_the_purge_once_an_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from shared.core.settings import Settings
    from shared.retention import periodic

    clock = {"now": 1000.0}
    monkeypatch.setattr("shared.retention.periodic.time.monotonic", lambda: clock["now"])
    monkeypatch.setattr(periodic, "current", lambda: SimpleNamespace(redis=None))
    monkeypatch.setattr(periodic, "get_settings", lambda: Settings(purge_interval_seconds=300))
    monkeypatch.setattr(periodic, "_last_published", 1000.0)  # the worker just started
    assert not periodic.purge_due()
    clock["now"] += 299
    assert not periodic.purge_due()
    clock["now"] += 2
    assert periodic.purge_due()
    assert not periodic.purge_due()  # once an interval
    clock["now"] += 301
    assert periodic.purge_due()
