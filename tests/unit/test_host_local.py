"""A shared database beside host-local parts is named at start (issue 28): API and
worker hosts on such a configuration lose each other's work without an error."""

from __future__ import annotations

from pathlib import Path

from cli.startup import host_local_parts
from shared.core.settings import Settings

SERVER = "postgresql://app@db.internal/imagegen"


def settings(**values: object) -> Settings:
    base: dict[str, object] = {"database_url": None, "broker_url": None, "s3_bucket": None}
    return Settings(**{**base, "data_dir": Path("/srv/imagegen"), **values})  # type: ignore[arg-type]


def test_a_shared_database_with_the_folder_broker_and_local_files_names_both() -> None:
    parts = host_local_parts(settings(database_url=SERVER))
    assert len(parts) == 2
    assert "/srv/imagegen/broker" in parts[0]
    assert "IMAGEGEN_BROKER_URL" in parts[0]
    assert "/srv/imagegen/files" in parts[1]
    assert "IMAGEGEN_S3_BUCKET" in parts[1]


def test_each_part_is_named_alone() -> None:
    broker_only = host_local_parts(settings(database_url=SERVER, s3_bucket="images"))
    assert [("IMAGEGEN_BROKER_URL" in p) for p in broker_only] == [True]
    files_only = host_local_parts(settings(database_url=SERVER, broker_url="redis://r:6379/0"))
    assert [("IMAGEGEN_S3_BUCKET" in p) for p in files_only] == [True]


def test_nothing_is_said_for_sqlite_or_a_deployment_sharing_everything() -> None:
    assert host_local_parts(settings()) == []  # embedded: one host by nature
    shared = settings(database_url=SERVER, broker_url="redis://r:6379/0", s3_bucket="images")
    assert host_local_parts(shared) == []
