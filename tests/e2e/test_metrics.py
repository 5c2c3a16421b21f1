"""/metrics sums the host's processes: what the worker counted shows on the API."""

from __future__ import annotations

import httpx

from tests.support.stack import Stack


def test_the_workers_counters_show_on_the_apis_metrics(stack: Stack) -> None:
    with stack.client() as client:
        assert (
            client.post(
                "/v1/images/generations",
                json={"model": "fake-fast", "prompt": "metrics", "size": "64x64"},
            ).status_code
            == 200
        )
    text = httpx.get(
        f"{stack.base_url}/metrics", headers={"Authorization": "Bearer sk-admin-test"}
    ).text
    # Counted by the worker process, summed from the shared multiprocess files.
    assert 'imagegen_jobs_finished_total{model="fake-fast",status="succeeded"}' in text
    assert 'imagegen_provider_call_duration_seconds_count{model="fake-fast"}' in text
    assert 'imagegen_storage_writes_total{outcome="ok"}' in text
    # And the API's own.
    assert 'route="/v1/images/generations",status="200"' in text
    assert httpx.get(f"{stack.base_url}/metrics").status_code == 401
