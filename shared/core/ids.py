"""Identifiers: time-ordered UUIDv7s with a readable prefix, so ids sort by creation."""

from __future__ import annotations

import uuid6


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid6.uuid7().hex}"
