"""What no store can hold: NUL characters (PostgreSQL's text and jsonb refuse them)
and lone UTF-16 surrogates (no UTF-8 encoder writes them). Checked at every door a
string comes in by: API requests, batch input lines, provider answers."""

from __future__ import annotations

import re
from typing import Any

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


def unstorable(value: str) -> str | None:
    """What is wrong with ``value`` in words, or None when any store can hold it."""
    found = _BAD_CHAR.search(value)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "an unpaired UTF-16 surrogate"


def find_unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first (dotted path, problem) in a parsed JSON value, keys included."""
    if isinstance(value, str):
        what = unstorable(value)
        return (path, what) if what else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            what = unstorable(str(key))
            if what:
                return where, what
            found = find_unstorable(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_unstorable(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None


def clean(value: str | None) -> str | None:
    """A provider's text with what no store can hold dropped (NUL; surrogates
    replaced): an upstream's odd answer must not fail recording a finished job."""
    if value is None or _BAD_CHAR.search(value) is None:
        return value
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
