"""A per-key throttle for work triggered by every finished job (the batch tick)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Throttle:
    """Runs ``fn(key)`` at most once per interval per key in this process, with a
    trailing call so the last event is never dropped. Topping a batch up and
    announcing its progress after every line cost a transaction and a publish per
    line; a few times a second is enough (the sweeper pumps too)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._trailing: set[str] = set()
        self._lock = threading.Lock()

    def call(self, key: str, fn: Callable[[str], object]) -> None:
        now = time.monotonic()
        with self._lock:
            wait = self._last.get(key, 0.0) + self.interval - now
            if wait > 0:
                if key not in self._trailing:
                    self._trailing.add(key)
                    timer = threading.Timer(wait, self._run_trailing, args=(key, fn))
                    # Not a daemon: a worker shutting down (warm) lets a tick finish.
                    # A tick may be finalizing a batch; cut off, the batch would sit
                    # in `finalizing` until the sweeper's 5-minute refinalize.
                    timer.daemon = False
                    timer.start()
                return
            self._last[key] = now
            if len(self._last) > 10_000:  # forget batches long finished
                self._last = {k: v for k, v in self._last.items() if now - v < 60}
        self._safe(fn, key)

    def _run_trailing(self, key: str, fn: Callable[[str], object]) -> None:
        with self._lock:
            self._trailing.discard(key)
            self._last[key] = time.monotonic()
        self._safe(fn, key)

    @staticmethod
    def _safe(fn: Callable[[str], object], key: str) -> None:
        try:
            fn(key)
        except Exception:  # the sweeper retries; never fail the job for this
            log.exception("batch tick for %s failed", key)
