"""The per-process caches: what they keep, and when they refuse to keep it."""

from __future__ import annotations

import pytest

from shared.core import invalidation
from shared.core.invalidation import InvalidatedCache, _apply


@pytest.fixture
def subscribed(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process's invalidation subscription were up."""
    monkeypatch.setattr(invalidation._LISTENER, "ensure_started", lambda: True)
    monkeypatch.setattr(invalidation._LISTENER, "connected", True)


def test_a_hit_skips_the_load(subscribed: None) -> None:
    cache: InvalidatedCache[str] = InvalidatedCache("unit-hit")
    loads = iter(["v1", "v2"])
    assert cache.get("k", lambda: next(loads)) == "v1"
    assert cache.get("k", lambda: next(loads)) == "v1"
    assert next(loads) == "v2"  # loaded once


def test_an_invalidation_message_drops_the_key(subscribed: None) -> None:
    cache: InvalidatedCache[str] = InvalidatedCache("unit-drop")
    cache.get("a", lambda: "old a")
    cache.get("b", lambda: "old b")
    _apply(b'{"cache": "unit-drop", "key": "a"}')
    assert cache.get("a", lambda: "new a") == "new a"
    assert cache.get("b", lambda: "new b") == "old b"
    _apply(b'{"cache": "unit-drop", "key": null}')  # every key
    assert cache.get("b", lambda: "new b") == "new b"
    _apply(b"not json")  # ignored, not fatal
    assert cache.get("b", lambda: "newer b") == "new b"


def test_a_read_racing_an_invalidation_is_not_stored(subscribed: None) -> None:
    cache: InvalidatedCache[str] = InvalidatedCache("unit-race")
    value, generation = cache.cached("k")
    assert value is None
    # The row changes and its invalidation arrives while the old row is being read.
    _apply(b'{"cache": "unit-race", "key": "k"}')
    cache.store("k", "stale", generation)
    assert cache.get("k", lambda: "fresh") == "fresh"


def test_nothing_is_cached_without_the_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invalidation._LISTENER, "ensure_started", lambda: False)
    cache: InvalidatedCache[int] = InvalidatedCache("unit-off")
    loads = iter(range(10))
    assert cache.get("k", lambda: next(loads)) == 0
    assert cache.get("k", lambda: next(loads)) == 1


def test_losing_the_subscription_empties_every_cache(subscribed: None) -> None:
    cache: InvalidatedCache[str] = InvalidatedCache("unit-lost")
    cache.get("k", lambda: "before")
    invalidation._drop_everything()  # what the listener does when it disconnects
    assert cache.get("k", lambda: "after") == "after"


def test_an_entry_is_read_again_after_its_max_age(
    subscribed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop for a change whose writer could not announce it."""
    cache: InvalidatedCache[str] = InvalidatedCache("unit-age")
    now = [1000.0]
    monkeypatch.setattr("shared.core.invalidation.time.monotonic", lambda: now[0])
    cache.get("k", lambda: "first")
    now[0] += invalidation.MAX_AGE_SECONDS - 1
    assert cache.get("k", lambda: "second") == "first"
    now[0] += 2
    assert cache.get("k", lambda: "second") == "second"
