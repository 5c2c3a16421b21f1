"""Durations as clients write them in headers (``Cancel-After``, the life asked for
a request's images): Go's ``time.ParseDuration`` grammar, as Replicate takes
``Cancel-After`` (https://replicate.com/docs/topics/predictions/lifecycle): a
sequence of a decimal number and a unit, ``30s``, ``5m``, ``1h30m``, ``1.5h``,
``250ms``; units ``ms``, ``s``, ``m``, ``h``. A bare number is seconds (as
``Retry-After``). No sign, no ``us``/``ns`` (no job is that short), nothing else.
"""

from __future__ import annotations

import math
import re

from shared.core.errors import InvalidRequest

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longer than anything a client has reason to write (a header, not a document).
MAX_CHARS = 32


def parse_duration(text: str, *, what: str, least: float = 0.0, most: float = math.inf) -> float:
    """``text`` in seconds; InvalidRequest naming ``what`` (the header) when it is
    not a duration or falls outside ``least``..``most`` seconds."""
    value = text.strip()
    seconds: float | None = None
    if 0 < len(value) <= MAX_CHARS:
        if re.fullmatch(r"\d+(?:\.\d+)?", value):
            seconds = float(value)
        elif re.fullmatch(f"(?:{_PART.pattern})+", value):
            seconds = sum(float(n) * _SECONDS[u] for n, u in _PART.findall(value))
    if seconds is None or not math.isfinite(seconds):
        raise InvalidRequest(
            f"{what}: {text[:MAX_CHARS]!r} is not a duration (write e.g. 30s, 5m or 1h30m)",
            param=what,
        )
    if not least <= seconds <= most:
        raise InvalidRequest(
            f"{what}: {text[:MAX_CHARS]!r} must be between {_human(least)} and {_human(most)}",
            param=what,
        )
    return seconds


def _human(seconds: float) -> str:
    if math.isinf(seconds):
        return "any length"
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
