"""Rows and objects of finished jobs written straight to SQL and storage, in bulk:
what the purge's tests and bench/bench_purge.py start from (a million API calls
would measure the API, not the purge)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import sqlalchemy as sa

from shared.core.columns import table
from shared.core.ids import new_id
from shared.jobs.models import Image, Job, JobStatus

ROWS_PER_STATEMENT = 1000


def seed_jobs(
    engine: sa.Engine,
    put: Callable[[str], object],
    project_id: str,
    *,
    jobs: int,
    images_per_job: int,
    created_at: datetime,
    threads: int = 16,
) -> list[str]:
    """``jobs`` succeeded jobs of ``images_per_job`` images each, made at
    ``created_at``; ``put(key)`` stores each image's object. Returns the image keys."""
    job_rows, image_rows, keys = [], [], []
    for _ in range(jobs):
        job_id = new_id("job")
        job_rows.append(
            {
                "id": job_id,
                "project_id": project_id,
                "status": JobStatus.succeeded,
                "surface": "openai",
                "model": "procedural",
                "queue": "default",
                "request": {
                    "model": "procedural",
                    "prompt": "seeded",
                    "n": images_per_job,
                    "size": "64x64",
                },
                "attempts": 1,
                "upstream_open": False,
                "created_at": created_at,
                "finished_at": created_at,
            }
        )
        for index in range(images_per_job):
            key = f"{project_id}/{job_id}/{index}.png"
            keys.append(key)
            image_rows.append(
                {
                    "id": new_id("img"),
                    "project_id": project_id,
                    "job_id": job_id,
                    "index": index,
                    "storage_key": key,
                    "content_type": "image/png",
                    "width": 64,
                    "height": 64,
                    "size_bytes": 1,
                    "created_at": created_at,
                }
            )
    with engine.begin() as conn:
        for start in range(0, len(job_rows), ROWS_PER_STATEMENT):
            conn.execute(sa.insert(table(Job)), job_rows[start : start + ROWS_PER_STATEMENT])
        for start in range(0, len(image_rows), ROWS_PER_STATEMENT):
            conn.execute(sa.insert(table(Image)), image_rows[start : start + ROWS_PER_STATEMENT])
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, keys))
    return keys
