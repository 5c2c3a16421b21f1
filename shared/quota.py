"""A project's storage quota (``storage_quota_bytes``), checked before new work is
accepted (generations, edits, variations, batches, file uploads).

Cheap on the hot path: a project without a quota costs nothing (the principal carries
the quota, null: no query, no thread). With one, its stored bytes (three indexed sums,
``shared/usage.py``) are summed at most once every ``CACHE_SECONDS`` per process,
one request summing while the others of that project wait for its answer; within
that window a project may pass its quota by what those requests store, and a
project that deleted enough is let in again at most that much later. Process memory
rather than Redis: a stale figure for a few seconds is the bargain either way, and
this needs no round trip and works on the embedded setup (no Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlmodel import Session

from shared.core.errors import StorageQuotaExceeded
from shared.usage import storage_bytes

CACHE_SECONDS = 5.0

UnitOfWork = Callable[[], AbstractContextManager[Session]]


class StoredBytes:
    """Each project's stored bytes as last summed, for ``ttl`` seconds."""

    def __init__(self, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._values: dict[str, tuple[int, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.sums = 0  # how many times a sum ran (tests, the benchmark)

    def cached(self, project_id: str) -> int | None:
        """The figure if it is fresh, else None (no query)."""
        entry = self._values.get(project_id)
        if entry is not None and self.clock() < entry[1]:
            return entry[0]
        return None

    def get(self, project_id: str, unit_of_work: UnitOfWork) -> int:
        """The fresh figure, summed now if it is stale (once for concurrent callers)."""
        with self._guard:
            lock = self._locks.setdefault(project_id, threading.Lock())
        with lock:
            value = self.cached(project_id)
            if value is not None:
                return value
            with unit_of_work() as session:
                value = storage_bytes(session, project_id)
            self.sums += 1
            self._values[project_id] = (value, self.clock() + self.ttl)
            return value

    def forget(self) -> None:
        self._values.clear()


STORED = StoredBytes()


def refuse_if_full(project_id: str, stored: int, quota: int) -> None:
    if stored >= quota:
        raise StorageQuotaExceeded(
            f"This project stores {stored} bytes, and its storage quota is {quota} bytes: "
            "new work is refused until it deletes jobs, batches or files (or they expire), "
            "or the quota is raised.",
        )
