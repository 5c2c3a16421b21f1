"""Refuse at the door what no store can hold (``shared.core.storable``): in path
parameters, query parameters and JSON bodies, answering 400 naming the param before
anything is recorded.

Runs as an application-wide dependency, so it comes before every route's own
dependencies and body handling, and its error renders in the surface's shape.
"""

from __future__ import annotations

import json
import re

from fastapi import Request

from shared.core.errors import InvalidValue
from shared.core.storable import find_unstorable, unstorable

# Only bodies with one of these escapes can hold a NUL or a surrogate once parsed
# (raw control bytes are refused by the JSON parser itself); every other body skips
# the walk, so the common request pays one bytes scan.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def refuse(param: str, what: str) -> InvalidValue:
    return InvalidValue(
        f"Invalid value for '{param}': it contains {what}, which is not allowed.", param=param
    )


def check_text(value: str, param: str) -> None:
    """Raise InvalidValue naming ``param`` if ``value`` cannot be stored."""
    what = unstorable(value)
    if what:
        raise refuse(param, what)


async def guard_input(request: Request) -> None:
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, name)
    for name, value in request.query_params.multi_items():
        check_text(name, name)
        check_text(value, name)
    if request.method in ("POST", "PUT", "PATCH"):
        ctype = request.headers.get("content-type", "application/json")
        if "json" in ctype:
            body = await request.body()  # cached: the route reads the same bytes
            if _SUSPECT.search(body):
                try:
                    parsed = json.loads(body)
                except ValueError:
                    return  # not JSON: the route answers that in its own words
                found = find_unstorable(parsed)
                if found:
                    raise refuse(found[0] or "body", found[1])
