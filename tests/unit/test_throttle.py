"""The batch tick's throttle: at most once per interval per key, never dropping the last."""

from __future__ import annotations

import threading
import time

from worker.throttle import Throttle


def test_calls_within_the_interval_fold_into_one_trailing_call() -> None:
    calls: list[str] = []
    done = threading.Event()

    def fn(key: str) -> None:
        calls.append(key)
        if len(calls) == 2:
            done.set()

    throttle = Throttle(0.05)
    for _ in range(20):
        throttle.call("batch", fn)
    assert calls == ["batch"]  # the first runs at once, the rest wait
    assert done.wait(2), "the trailing call never ran"
    time.sleep(0.1)
    assert calls == ["batch", "batch"]  # one trailing call for the whole burst


def test_keys_are_throttled_apart_and_errors_do_not_escape() -> None:
    seen: list[str] = []

    def fn(key: str) -> None:
        seen.append(key)
        raise RuntimeError("a failing tick")

    throttle = Throttle(10)
    throttle.call("a", fn)
    throttle.call("b", fn)
    assert seen == ["a", "b"]
