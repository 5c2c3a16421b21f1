"""The local file store: round trip, and keys that would leave its folder refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.core.errors import NotFound
from shared.core.storage import LocalStorage


def test_put_then_get_returns_the_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files", "secret")
    storage.put("proj_1/job_1/0.png", b"png-bytes", "image/png")
    assert storage.get("proj_1/job_1/0.png") == b"png-bytes"
    assert (tmp_path / "files" / "proj_1" / "job_1" / "0.png").read_bytes() == b"png-bytes"


@pytest.mark.parametrize(
    "key",
    [
        "../secret_key",
        "proj_1/../../secret_key",
        "/etc/passwd",
        "proj_1//0.png",
        "./0.png",
        "",
        "proj_1\\..\\x",
        "a\x00b",
    ],
)
def test_keys_outside_the_store_are_refused(tmp_path: Path, key: str) -> None:
    (tmp_path / "secret_key").write_text("s3cr3t")
    storage = LocalStorage(tmp_path / "files", "secret")
    with pytest.raises(NotFound):
        storage.get(key)
    with pytest.raises(NotFound):
        storage.put(key, b"x", "image/png")
