"""A schema's operations as pytest parameters, each with its own id.

Not schemathesis' ``@schema.parametrize()``: its items all share the test
function's node id, and pytest-xdist (pyproject's addopts) schedules by node id,
so under it only the first operation ran and the others were silently dropped.
"""

from __future__ import annotations

from typing import Any

import pytest
from schemathesis.core.result import Err
from schemathesis.schemas import APIOperation, BaseSchema

Operation = APIOperation[Any, Any, Any, Any]


def operations(schema: BaseSchema) -> list[Any]:
    """``pytest.param(operation, id="POST /path")`` for each of the schema's
    operations; an operation the document cannot describe fails loudly."""
    found = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        found.append(pytest.param(operation, id=operation.label))
    return found
