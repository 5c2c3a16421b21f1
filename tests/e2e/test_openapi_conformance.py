"""Schemathesis against the service's own OpenAPI document: no 5xx, no response
that contradicts the document. Examples are bounded (15 per operation) to keep the suite fast.

The document is taken from the app object at import (no server is needed for
that); the calls go over HTTP to the running stack.
"""

from __future__ import annotations

from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, settings

from api.app import create_app
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


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case[Any], stack: Stack, http: requests.Session
) -> None:
    case.call_and_validate(
        base_url=stack.base_url,
        session=http,
        headers={"Authorization": f"Bearer {stack.key_a}"},
        timeout=60,
        excluded_checks=EXCLUDED,
    )
