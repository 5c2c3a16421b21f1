"""Help names what a value is, not its Python type: typer's generated help,
patched once the command tree is built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _without_text_type(display: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """An argument's help line without typer's ``<str>`` (``PROMPT``, not
    ``PROMPT <str>``); other types (``<int>``, a path) still show."""

    def shown(ctx: Any) -> str | None:
        label = display(ctx)
        return None if label == "<str>" else label

    return shown


def name_values(command: Any) -> None:
    """Help names what a value is (``--model MODEL``, ``PROMPT``), not its Python
    type (typer's ``<str>``). Duck-typed: typer carries its own copy of click."""
    for param in command.params:
        if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
            param.metavar = param.name.upper()
        if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
            param.display_type_rich = _without_text_type(param.display_type_rich)
    for sub in getattr(command, "commands", {}).values():
        name_values(sub)
