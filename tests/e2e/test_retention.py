"""The purge as deployed (issue 29): the ``imagegen.purge`` task, run by a real
Celery worker, deletes from S3 (moto) the images a project's retention puts past
their time; the job stays readable with ``expired`` markers. (The purge's cases are
in tests/service/test_retention.py and test_purge_postgres.py; this checks the
task is wired to a worker.)"""

from __future__ import annotations

import boto3
import httpx
import sqlalchemy as sa
from botocore.exceptions import ClientError
from celery import Celery

from tests.support.processes import wait_for
from tests.support.stack import Stack

ADMIN = {"Authorization": "Bearer sk-admin-test"}


def test_the_workers_purge_task_deletes_expired_images_from_s3(stack: Stack) -> None:
    name = f"retention-{stack.port}"
    key = stack.create_key(name)
    job = stack.wait_job(stack.submit("kept a while", key=key, n=2)["id"], key)
    assert job["status"] == "succeeded"
    patched = httpx.patch(
        f"{stack.base_url}/v1/admin/projects/{name}",
        headers=ADMIN,
        json={"image_retention_seconds": 3600},
    )
    assert patched.status_code == 200, patched.text
    engine = sa.create_engine(stack.database_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:  # made two hours ago
        keys = list(
            conn.execute(
                sa.text(
                    "UPDATE image SET created_at = now() - interval '2 hours' "
                    "WHERE job_id = :j RETURNING storage_key"
                ),
                {"j": job["id"]},
            ).scalars()
        )
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["IMAGEGEN_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = stack.env["IMAGEGEN_S3_BUCKET"]

    def gone(key: str) -> bool:
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except ClientError:
            return True
        return False

    try:
        assert len(keys) == 2
        assert not any(gone(k) for k in keys)
        app = Celery(broker=stack.env["IMAGEGEN_BROKER_URL"])
        try:
            app.send_task("imagegen.purge", queue="default")
        finally:
            app.close()
        wait_for(lambda: all(gone(k) for k in keys), 30, "the purge task")
    finally:
        s3.close()
    with engine.connect() as conn:
        marked = conn.execute(
            sa.text("SELECT count(*) FROM image WHERE job_id = :j AND expired_at IS NOT NULL"),
            {"j": job["id"]},
        ).scalar_one()
    engine.dispose()
    assert marked == 2
    with stack.client(key) as client:
        read = client.get(f"/v1/images/jobs/{job['id']}").json()
    assert read["status"] == "succeeded"
    assert read["result"]["data"] == [{"expired": True}, {"expired": True}]
