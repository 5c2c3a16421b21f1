"""The embedded broker never shows a reader a half-written message."""

from __future__ import annotations

import queue as stdqueue
import threading
import time
from pathlib import Path

import pytest
from kombu.connection import Connection

from shared.core.fs_broker import SCHEME


def test_concurrent_writers_and_a_reader_lose_and_garble_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    folder.mkdir()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "store_processed": False,
    }

    def write(start: int) -> None:
        with Connection(f"{SCHEME}://", transport_options=options) as conn:
            for i in range(start, start + 100):
                conn.default_channel._put("jobs", {"n": i})

    writers = [threading.Thread(target=write, args=(k * 100,)) for k in range(4)]
    for t in writers:
        t.start()
    received: list[int] = []
    deadline = time.monotonic() + 30
    with Connection(f"{SCHEME}://", transport_options=options) as conn:
        channel = conn.default_channel
        while len(received) < 400 and time.monotonic() < deadline:
            try:
                received.append(channel._get("jobs")["n"])  # a torn file would raise here
            except stdqueue.Empty:
                time.sleep(0.001)
    for t in writers:
        t.join()
    assert sorted(received) == list(range(400))
    assert not list(folder.glob("*.tmp"))


def test_a_message_file_appears_only_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic check of the mechanism: while the payload is being serialized
    (before any byte is written) no ``.msg`` file may exist yet. kombu's own
    transport creates the file first, which is the window a reader fell into."""
    import shared.core.fs_broker

    seen: list[list[str]] = []
    real_dumps = shared.core.fs_broker.dumps

    def spying_dumps(payload: object) -> str:
        seen.append(sorted(p.name for p in tmp_path.glob("*.msg")))
        return str(real_dumps(payload))

    monkeypatch.setattr(shared.core.fs_broker, "dumps", spying_dumps)
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    with Connection(f"{SCHEME}://", transport_options=options) as conn:
        conn.default_channel._put("jobs", {"n": 1})
        conn.default_channel._put("jobs", {"n": 2})
    # Serializing the first: nothing yet; the second: only the finished first one.
    assert seen[0] == []
    assert len(seen[1]) == 1
    assert len(list(tmp_path.glob("*.jobs.msg"))) == 2
