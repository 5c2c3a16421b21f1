"""``GET /v1/usage``: jobs by status, images, pixels and provider tokens, by day and model."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import boto3
import httpx
from PIL import Image as PILImage

from tests.support.stack import Stack

ADMIN = {"Authorization": "Bearer sk-admin-test"}


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


def test_storage_bytes_match_s3_and_the_quota_holds_across_processes(stack: Stack) -> None:
    """On PostgreSQL and S3 (moto): ``storage_bytes`` is what the bucket holds under
    the project; a quota set over the admin API refuses the next request at once (the
    API's cached principal dropped over Redis), audited; removed, work goes on."""
    name = f"storage-{stack.port}"
    key = stack.create_key(name)
    image = io.BytesIO()
    PILImage.new("RGB", (64, 64), (200, 10, 10)).save(image, "PNG")
    upload = b'{"a": 1}\n' * 50
    with stack.client(key) as client:
        made = client.post(
            "/v1/images/generations", json={"model": "procedural", "prompt": "s", "size": "64x64"}
        )
        assert made.status_code == 200, made.text
        edit = client.post(
            "/v1/images/edits",
            files={"image": ("in.png", image.getvalue(), "image/png")},
            data={"model": "procedural", "prompt": "blue", "size": "64x64"},
        )
        assert edit.status_code == 200, edit.text
        filed = client.post(
            "/v1/files", files={"file": ("n.jsonl", upload)}, data={"purpose": "user_data"}
        )
        assert filed.status_code == 200, filed.text
        report = client.get("/v1/usage").json()
        projects = httpx.get(f"{stack.base_url}/v1/admin/projects", headers=ADMIN).json()
        project_id = next(p["id"] for p in projects["data"] if p["name"] == name)
        s3 = boto3.client(
            "s3",
            endpoint_url=stack.env["IMAGEGEN_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            listed = s3.list_objects_v2(
                Bucket=stack.env["IMAGEGEN_S3_BUCKET"], Prefix=f"{project_id}/"
            )
        finally:
            s3.close()
        in_bucket = sum(obj["Size"] for obj in listed.get("Contents", []))
        assert report["storage"]["inputs_bytes"] == len(image.getvalue())
        assert report["storage"]["files_bytes"] == len(upload)
        assert report["storage_bytes"] == in_bucket

        patch = f"{stack.base_url}/v1/admin/projects/{name}"
        quota = {"storage_quota_bytes": report["storage_bytes"]}
        assert httpx.patch(patch, headers=ADMIN, json=quota).status_code == 200
        refused = client.post(
            "/v1/images/generations", json={"model": "procedural", "prompt": "s", "size": "64x64"}
        )
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "storage_quota_exceeded"
        cleared = {"storage_quota_bytes": None}
        assert httpx.patch(patch, headers=ADMIN, json=cleared).status_code == 200
        again = client.post(
            "/v1/images/generations", json={"model": "procedural", "prompt": "s", "size": "64x64"}
        )
        assert again.status_code == 200
    audit = httpx.get(
        f"{stack.base_url}/v1/admin/audit",
        headers=ADMIN,
        params={"project": name, "action": "quota.update"},
    ).json()["data"]
    assert [e["details"]["changes"]["storage_quota_bytes"]["to"] for e in audit] == [
        None,
        report["storage_bytes"],
    ]
    assert {e["actor"] for e in audit} == {"admin"}
