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


# The deepest nesting of arrays and objects a JSON body may have.
MAX_JSON_DEPTH = 64


def check_depth(body: bytes) -> None:
    """Raise InvalidValue if the JSON ``body`` nests deeper than MAX_JSON_DEPTH."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        parsed = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError:
        return  # not JSON: the route answers that in its own words
    else:
        depth = _depth(parsed)
    if depth > MAX_JSON_DEPTH:
        raise InvalidValue(
            f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
            param="body",
        )


def _depth(value: object) -> int:
    """Nesting depth, walked without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level + 1)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in node)
    return deepest


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
            # Two C-level counts on the common body; only one with many brackets is
            # parsed here to measure its depth (900 levels of a native batch's
            # `shared` answered 500).
            if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
                check_depth(body)
            if _SUSPECT.search(body):
                try:
                    parsed = json.loads(body)
                except ValueError:
                    return  # not JSON: the route answers that in its own words
                found = find_unstorable(parsed)
                if found:
                    raise refuse(found[0] or "body", found[1])
