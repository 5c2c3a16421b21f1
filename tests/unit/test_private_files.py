"""The data directory, its secrets and the SQLite database are this user's alone:
made private when created (whatever the umask), tightened with a warning where an
older install left them readable by others."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from shared.core.db import make_engine
from shared.core.private_files import private_dir, tighten, write_private_file
from shared.core.settings import Settings
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "not-to-be-logged-" + "x" * 40


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """A umask that takes nothing away: the modes must come from the code."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def use_database(path: Path) -> None:
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x TEXT)"))
            connection.execute(sa.text("INSERT INTO t VALUES ('a')"))
        with engine.connect() as connection:  # open: its -wal and -shm exist
            connection.execute(sa.text("SELECT * FROM t")).all()
            for suffix in ("-wal", "-shm"):
                assert mode(path.with_name(path.name + suffix)) == 0o600, suffix
    finally:
        engine.dispose()


def test_new_ones_are_private_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    data = tmp_path / "parent" / "data"
    settings = Settings(data_dir=data)
    key = settings.resolved_secret_key()
    assert mode(data) == 0o700
    assert mode(data / "secret_key") == 0o600
    assert settings.resolved_secret_key() == key  # kept, not made again
    assert write_private_file(data / "dev_api_key", "sk-one")
    assert not write_private_file(data / "dev_api_key", "sk-two")  # the first stays
    assert (data / "dev_api_key").read_text() == "sk-one"
    assert mode(data / "dev_api_key") == 0o600
    assert sorted(p.name for p in data.iterdir()) == ["dev_api_key", "secret_key"]  # no tmp left
    use_database(data / "imagegen.db")
    assert mode(data / "imagegen.db") == 0o600
    private_dir(data / "again")
    assert mode(data / "again") == 0o700


def test_an_older_install_is_tightened_with_a_warning_naming_path_and_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    loose = {
        "secret_key": SECRET,
        "dev_api_key": "sk-" + SECRET,
        "imagegen.db": "",
        "imagegen.db-wal": "",
    }
    for name, text in loose.items():
        (data / name).write_text(text)
        os.chmod(data / name, 0o644)

    with caplog.at_level(logging.WARNING, logger="shared.core.private_files"):
        assert Settings(data_dir=data).resolved_secret_key() == SECRET
        tighten(data / "dev_api_key")  # what `imagegen dev` does with its key file
        use_database(data / "imagegen.db")

    assert mode(data) == 0o700
    for name in loose:
        if name != "imagegen.db-wal":  # SQLite's last close checkpointed it away
            assert mode(data / name) == 0o600, name
    warned = [r.getMessage() for r in caplog.records]
    for path, old in [(data, "0o755"), *((data / name, "0o644") for name in loose)]:
        assert [w for w in warned if str(path) in w and old in w], (path, warned)
    assert SECRET not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.core.private_files"):
        Settings(data_dir=data).resolved_secret_key()
        use_database(data / "imagegen.db")
    assert not caplog.records  # once tight, nothing more to say


def test_imagegen_dev_makes_its_data_private_and_fixes_an_older_one(tmp_path: Path) -> None:
    """The real command: a fresh data dir, then one left readable by an older version."""
    data = tmp_path / "data"
    run_dev(data)
    assert mode(data) == 0o700
    for name in ("secret_key", "dev_api_key", "imagegen.db"):
        assert mode(data / name) == 0o600, name

    os.chmod(data, 0o755)
    for name in ("secret_key", "dev_api_key", "imagegen.db"):
        os.chmod(data / name, 0o644)
    secret = (data / "secret_key").read_text()
    key = (data / "dev_api_key").read_text()
    stderr = run_dev(data)
    assert mode(data) == 0o700
    for name in ("secret_key", "dev_api_key", "imagegen.db"):
        assert mode(data / name) == 0o600, name
        assert f"{data / name} was readable by other users (mode 0o644)" in stderr, name
    assert f"{data} was readable by other users (mode 0o755)" in stderr
    assert secret not in stderr
    assert (data / "dev_api_key").read_text() == key  # kept


def run_dev(data: Path) -> str:
    """``imagegen dev`` until it answers, then stopped; its stderr."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "IMAGEGEN_DATA_DIR": str(data),
        "IMAGEGEN_PORT": str(port),
        "COLUMNS": "300",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "dev"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "imagegen dev ended"
            assert time.monotonic() < deadline, "imagegen dev never answered"
            try:
                # /readyz: the storage (with its secret key) is made by then.
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    return stderr
