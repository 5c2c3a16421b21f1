"""The CLI's tables: ids whole (they are what get, cancel and revoke take) and the
status beside them whole, in the lightest frame, so an 80-column terminal shows
both before anything else is cut."""

from __future__ import annotations

from rich import box
from rich.table import Table


def table(*headers: str) -> Table:
    grid = Table(*headers, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in grid.columns[:2]:
        column.no_wrap = True
    return grid
