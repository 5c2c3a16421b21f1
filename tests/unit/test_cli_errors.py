"""The CLI's errors a user can act on: one line naming the fix, no traceback."""

from __future__ import annotations

import fcntl
import socket
import subprocess
import sys
from pathlib import Path

import sqlalchemy

from tests.support.processes import PG_ADMIN_URL, free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``imagegen ARGS`` in a bare environment (plus ``env``), from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {"IMAGEGEN_API_KEY": "sk-test"})},
    )


def test_generate_with_no_server_names_the_url_and_imagegen_dev() -> None:
    port = free_port()
    result = cli("generate", "a fox", "--base-url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"nothing answered at http://127.0.0.1:{port}" in result.stderr
    assert "imagegen dev" in result.stderr


def test_batch_submit_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("batch", "submit", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def test_api_and_worker_refuse_an_unmigrated_database_naming_migrate(tmp_path: Path) -> None:
    for command in ("api", "worker"):
        result = cli(command, env={"IMAGEGEN_DATA_DIR": str(tmp_path / command)})
        assert result.returncode == 1, command
        assert "Traceback" not in result.stderr
        assert "run `imagegen migrate`" in result.stderr


def test_a_missing_postgresql_database_is_named_with_how_to_create_it() -> None:
    """The server answers but has no such database: a setup step, refused by
    migrate, api and worker alike with the fix (never a traceback, never the
    password)."""
    url = sqlalchemy.make_url(PG_ADMIN_URL).set(
        database="imagegen_never_created", password="sekret-pw"
    )
    for command in ("migrate", "api", "worker"):
        # the form every host and compose file gives
        given = url.render_as_string(hide_password=False).replace("+psycopg", "")
        result = cli(command, env={"IMAGEGEN_DATABASE_URL": given})
        assert result.returncode == 1, command
        assert "Traceback" not in result.stderr
        assert "the database 'imagegen_never_created' does not exist" in result.stderr
        assert "createdb imagegen_never_created" in result.stderr
        assert "sekret-pw" not in result.stderr


def test_an_unreachable_database_is_said_without_its_password_and_the_api_starts() -> None:
    db_port, port = free_port(), free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "IMAGEGEN_DATABASE_URL": f"postgresql://app:s3cret@127.0.0.1:{db_port}/imagegen",
        },
    )
    try:
        assert api.stderr is not None
        said = api.stderr.readline()  # the first line, before the server starts
        assert (
            f"cannot reach the database at postgresql+psycopg://app:***@127.0.0.1:{db_port}" in said
        )
        assert "s3cret" not in said
        assert api.poll() is None  # it goes on: an outage must not keep it down
    finally:
        api.terminate()
        api.wait(15)
        if api.stderr is not None:
            api.stderr.close()


def test_dev_on_a_port_in_use_says_so_before_printing_a_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cli", "dev", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "IMAGEGEN_DATA_DIR": str(tmp_path / "data")},
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert "API key" not in result.stdout + result.stderr


def test_a_second_dev_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with (data / "dev.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `imagegen dev`
        result = subprocess.run(
            [sys.executable, "-m", "cli", "dev", "--port", str(free_port())],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "IMAGEGEN_DATA_DIR": str(data)},
        )
    assert result.returncode == 1
    assert "another `imagegen dev` is running" in result.stderr
    assert "IMAGEGEN_DATA_DIR" in result.stderr


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("imagegen 0.")


def test_keys_outside_a_data_dir_refuse_and_leave_nothing_behind(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert f"no imagegen data at {tmp_path / '.imagegen'}" in result.stderr
    assert "IMAGEGEN_DATA_DIR" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no empty database made here
    # but a command's help works anywhere
    helped = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "revoke", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert helped.returncode == 0, helped.stderr
    assert "Revoke a key by id" in helped.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_names_values_not_python_types() -> None:
    generate = cli("generate", "--help").stdout
    worker = cli("worker", "--help").stdout
    assert "--model MODEL" in generate
    assert "-n, --n N" in generate
    assert "<str>" not in generate  # options and arguments alike
    assert "  PROMPT  [required]" in generate
    assert "<bool>" not in worker
    assert "--sweeper / --no-sweeper" in worker
