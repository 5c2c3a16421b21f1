"""Schemathesis against the service's own OpenAPI document: no 5xx, no response
that contradicts the document. Examples are bounded (10 per operation) to keep the suite fast.

The document is taken from the app object at import (no server is needed for
that); the calls go over HTTP to the running stack.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.app import create_app
from tests.support.schema_operations import Operation, operations
from tests.support.stack import Stack

schema = schemathesis.openapi.from_dict(create_app().openapi())

# positive_data_acceptance is left out on purpose: which sizes, qualities, styles
# and prompt lengths are valid depends on the chosen model (registry
# capabilities), which JSON Schema cannot express; such a request gets a
# documented 400, which does not contradict the document.
# negative_data_rejection too: unknown query parameters are ignored by design (as
# by most HTTP APIs and OpenAI's), and the key is added to every case here, so
# its "no Authorization header" negatives are not what was sent; missing keys and
# every invalid body are covered by tests/service/test_validation.py.
EXCLUDED = [
    schemathesis.checks.positive_data_acceptance,
    schemathesis.checks.negative_data_rejection,
]


# One test per operation (tests/support/schema_operations.py says why).
@pytest.mark.parametrize("operation", operations(schema))
def test_api_conforms_to_its_openapi_document(
    operation: Operation, stack: Stack, http: requests.Session
) -> None:
    # The admin API takes the admin key alone (a project key's every call there is a
    # 401, which tests nothing of the operation).
    admin = operation.path.startswith("/v1/admin")
    key = stack.env["IMAGEGEN_ADMIN_API_KEY"] if admin else stack.key_a

    @given(case=operation.as_strategy())
    @settings(
        max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def conforms(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=stack.base_url,
            session=http,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            excluded_checks=EXCLUDED,
        )

    conforms()
