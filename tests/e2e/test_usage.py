"""``GET /v1/usage``: jobs by status, images, pixels and provider tokens, by day and model."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.support.stack import Stack


def test_usage_by_day_and_model(stack: Stack) -> None:
    key = stack.create_key("usage-project")
    with stack.client(key) as client:
        assert (
            client.post(
                "/v1/images/generations",
                json={"model": "procedural", "prompt": "u1", "n": 2, "size": "64x64"},
            ).status_code
            == 200
        )
        assert (
            client.post(
                "/v1/images/generations",
                json={"model": "procedural", "prompt": "u2", "size": "256x256"},
            ).status_code
            == 200
        )
        assert (
            client.post(
                "/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "u3", "size": "64x64"},
            ).status_code
            == 200
        )
        assert (
            client.post(
                "/v1/images/generations",
                json={"model": "fake-fast", "prompt": "[content-policy] u4"},
            ).status_code
            == 400
        )
        report = client.get("/v1/usage").json()
        bad = client.get("/v1/usage", params={"start_date": "2026-02-01", "end_date": "2026-01-01"})
    today = datetime.now(UTC).date().isoformat()
    rows = {(r["date"], r["model"]): r for r in report["data"]}
    proc = rows[(today, "procedural")]
    assert proc["jobs"]["succeeded"] == 2
    assert proc["images"] == 3
    assert proc["pixels"] == 2 * 64 * 64 + 256 * 256
    gpt = rows[(today, "gpt-image-1")]
    assert gpt["provider_usage"] == {"input_tokens": 10, "output_tokens": 100, "total_tokens": 110}
    assert rows[(today, "fake-fast")]["jobs"]["failed"] == 1
    assert report["totals"] == {
        "jobs": 4,
        "images": 4,
        "pixels": 2 * 64 * 64 + 256 * 256 + 64 * 64,
        "cost_usd": 0.0,  # no model here has a price (tests/e2e/test_routing.py does)
    }
    assert report["project"] == "usage-project"
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "end_date"
