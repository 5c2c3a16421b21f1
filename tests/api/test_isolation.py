"""One project never sees another's jobs or images."""

from __future__ import annotations

import httpx

from tests.support.stack import Stack


def test_other_project_cannot_read_list_or_cancel_a_job(stack: Stack) -> None:
    with stack.client(stack.key_a) as alpha, stack.client(stack.key_b) as beta:
        resp = alpha.post("/v1/images/generations",
                          json={"model": "procedural", "prompt": "alpha's secret",
                                "size": "64x64"}, headers={"Prefer": "respond-async"})
        job_id = resp.json()["id"]
        assert stack.wait_job(job_id, stack.key_a)["status"] == "succeeded"
        for method, path in [("GET", f"/v1/images/jobs/{job_id}"),
                             ("POST", f"/v1/images/jobs/{job_id}/cancel")]:
            other = beta.request(method, path)
            assert other.status_code == 404, (method, path)
            assert "alpha's secret" not in other.text
        listed = beta.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
        assert job_id not in {j["id"] for j in listed}
        # Alpha still sees it, with its image.
        own = alpha.get(f"/v1/images/jobs/{job_id}").json()
        assert own["status"] == "succeeded"
        url = own["result"]["data"][0]["url"]
        assert httpx.get(url).status_code == 200
        # The stored object is namespaced by project and job.
        assert f"/{job_id}/" in url
