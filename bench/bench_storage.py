"""Storage accounting and the storage quota's cost (issue 29), run by hand:

    .venv/bin/python -m bench.bench_storage                  # 100,000 images
    .venv/bin/python -m bench.bench_storage --images 1000000

On a PostgreSQL database of its own (``IMAGEGEN_TEST_PG_URL``, the local server by
default): one project with ``--images`` images over a tenth as many jobs, one job
in ten an edit with stored inputs, a thousand files, a few jobs deleted and images
expired; and a hundred other projects with a hundred images each.

Reported: the time of one project's exact ``storage_bytes`` (three indexed sums,
what ``GET /v1/usage`` runs and what the quota check runs once per 5 s per API
process for a project with a quota), of every project's (the ``/metrics`` gauge,
once per 30 s), and the quota check's cost on the request path: without a quota
(no query, no thread hop: the target is that it costs nothing measurable) and with
one whose figure is cached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.ids import new_id
from tests.support.processes import PG_ADMIN_URL, create_database, drop_database


def _fill(engine: sa.Engine, images: int) -> str:
    from shared.files.models import File
    from shared.jobs.models import Image, Job
    from shared.projects.models import Project

    now = utcnow()
    project_id = new_id("proj")
    others = [new_id("proj") for _ in range(100)]
    with engine.begin() as conn:
        conn.execute(
            sa.insert(table(Project)),
            [{"id": p, "name": p, "created_at": now} for p in [project_id, *others]],
        )
        jobs_per_project = [(project_id, max(1, images // 10), 10)] + [(p, 10, 10) for p in others]
        for owner, jobs, per_job in jobs_per_project:
            for start in range(0, jobs, 5000):
                rows: list[dict[str, Any]] = []
                pictures: list[dict[str, Any]] = []
                for n in range(start, min(jobs, start + 5000)):
                    job_id = new_id("job")
                    rows.append(
                        {
                            "id": job_id,
                            "project_id": owner,
                            "status": "succeeded",
                            "model": "procedural",
                            "queue": "default",
                            "request": {},
                            "attempts": 1,
                            "upstream_open": False,
                            "created_at": now,
                            "input_bytes": 50_000 if n % 10 == 0 else None,
                            "deleted_at": now if n % 1000 == 1 else None,
                        }
                    )
                    pictures += [
                        {
                            "id": new_id("img"),
                            "project_id": owner,
                            "job_id": job_id,
                            "index": i,
                            "storage_key": f"{owner}/{job_id}/{i}.png",
                            "content_type": "image/png",
                            "width": 1024,
                            "height": 1024,
                            "size_bytes": 1_000_000 + i,
                            "created_at": now,
                            "expired_at": now - timedelta(days=1) if n % 500 == 2 else None,
                        }
                        for i in range(per_job)
                    ]
                conn.execute(sa.insert(table(Job)), rows)
                conn.execute(sa.insert(table(Image)), pictures)
        conn.execute(
            sa.insert(table(File)),
            [
                {
                    "id": new_id("file"),
                    "project_id": project_id,
                    "filename": "f.jsonl",
                    "purpose": "batch",
                    "bytes": 10_000,
                    "storage_key": f"{project_id}/files/{n}",
                    "created_at": now,
                }
                for n in range(1000)
            ],
        )
    # As autovacuum leaves a table that has settled: statistics and the visibility
    # map (which lets a sum be read from an index alone).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    return project_id


def _ms(run: Any, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        spent.append((time.perf_counter() - start) * 1000)
    return statistics.median(spent)


def _per_call_ns(check: Any, calls: int = 100_000) -> float:
    async def loop() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await check()
        return (time.perf_counter() - start) / calls * 1e9

    return asyncio.run(loop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    url = create_database(PG_ADMIN_URL)
    os.environ["IMAGEGEN_DATABASE_URL"] = url
    os.environ["IMAGEGEN_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-storage-")
    from shared.core import context
    from shared.core.db import get_engine, unit_of_work
    from shared.core.migrate import upgrade

    context.start()
    try:
        upgrade()
        started = time.perf_counter()
        project_id = _fill(get_engine(), args.images)
        print(f"filled {args.images:,} images in {time.perf_counter() - started:.1f} s")
        run_bench(project_id, unit_of_work)
    finally:
        context.stop()
        drop_database(url, PG_ADMIN_URL)


def run_bench(project_id: str, unit_of_work: Any) -> None:
    from api.deps import room_for
    from shared.projects.service import Principal
    from shared.quota import STORED
    from shared.usage import storage_bytes, storage_bytes_by_project

    def one() -> None:
        with unit_of_work() as session:
            storage_bytes(session, project_id)

    def every() -> None:
        with unit_of_work() as session:
            storage_bytes_by_project(session)

    with unit_of_work() as session:
        print(f"storage_bytes: {storage_bytes(session, project_id):,}")
    print(f"one project's storage_bytes: {_ms(one):.1f} ms (median of 5)")
    print(f"every project's (metrics):   {_ms(every):.1f} ms (median of 5)")
    free = Principal(key_id="k", project_id=project_id, project_name="p", user="u")
    quota = Principal(
        key_id="k", project_id=project_id, project_name="p", user="u", storage_quota_bytes=2**62
    )
    STORED.get(project_id, unit_of_work)  # the figure cached, as between sums

    async def no_quota() -> None:
        await room_for(free)

    async def cached() -> None:
        await room_for(quota)

    async def nothing() -> None:
        return None

    print(f"quota check, none set:  {_per_call_ns(no_quota):.0f} ns a request")
    print(f"quota check, cached:    {_per_call_ns(cached):.0f} ns a request")
    print(f"an empty awaited call:  {_per_call_ns(nothing):.0f} ns (for scale)")


if __name__ == "__main__":
    main()
