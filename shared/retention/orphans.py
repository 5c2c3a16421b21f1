"""Orphans: objects in storage that no row owns, found by scanning and deleted.

What owns a key, by its shape (keys are made in shared/core/storage.py,
shared/jobs/service.py:store_inputs, worker/upstream_jobs.py and
shared/files/service.py):

- ``{project}/{job}/{index}.{ext}``: an Image row of that job and index, not
  expired. A failed job's partial writes have none.
- ``{project}/{job}/input-N.{ext}``, ``{project}/{job}/mask.png``: the job's row (an
  idempotent edit replay stored inputs under a job id that was never recorded).
- ``{project}/{job}/upstream/...``: a queue provider's kept images, owned while the
  job is not finished (its images are stored as its own once it is).
- ``{project}/files/{file}``: a File row not deleted.
- anything ending ``.tmp``: a local upload that crashed before its rename.
Other shapes are not ours to judge and are left alone. An object younger than
``IMAGEGEN_ORPHAN_MIN_AGE_SECONDS`` is never touched, whatever its shape: it may
belong to a job whose row is not committed yet, or whose images are being recorded.

A run examines at most ``IMAGEGEN_ORPHAN_SCAN_LIMIT`` objects, project by project
(one listing prefix each), and keeps where it stopped (the last key) in Redis, or
in this process without it: the next run resumes there, and starts over once the
last project is done.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.storage import Storage, StoredObject
from shared.files.models import File
from shared.jobs.models import FINISHED, Image, Job
from shared.projects.models import Project
from shared.retention.purge import UnitOfWork

CURSOR_KEY = "imagegen:orphans:cursor"
_IMAGE = re.compile(r"(?P<index>\d+)\.[a-z0-9]+")
_INPUT = re.compile(r"(input-\d+|mask)\.[a-z0-9]+")


@dataclass
class Swept:
    examined: int = 0
    deleted: int = 0
    delete_calls: int = 0
    finished_round: bool = False


class Cursor:
    """Where the last run stopped: in Redis (shared by every worker), else here."""

    _local: str = ""

    def __init__(self) -> None:
        from shared.core.context import current  # a process's clients, made at its start

        self.redis = current().redis

    def get(self) -> str:
        if self.redis is None:
            return Cursor._local
        value = self.redis.get(CURSOR_KEY)
        return value.decode() if isinstance(value, bytes) else ""

    def set(self, key: str) -> None:
        if self.redis is None:
            Cursor._local = key
        else:
            self.redis.set(CURSOR_KEY, key)


@dataclass
class _Shapes:
    """One page's keys by what would own them."""

    images: dict[tuple[str, int], str] = field(default_factory=dict)
    jobs: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)


def _shapes(objects: list[StoredObject]) -> _Shapes:
    shapes = _Shapes()
    for obj in objects:
        parts = obj.key.split("/")
        if obj.key.endswith(".tmp"):
            continue  # never owned: a crashed upload's leftover
        if len(parts) < 3:
            shapes.unknown.add(obj.key)
            continue
        owner, rest = parts[1], "/".join(parts[2:])
        if owner == "files" and len(parts) == 3:
            shapes.files[rest] = obj.key
        elif match := _IMAGE.fullmatch(rest):
            shapes.images[(owner, int(match.group("index")))] = obj.key
        elif _INPUT.fullmatch(rest) or rest.startswith("upstream/"):
            shapes.jobs.setdefault(owner, []).append(obj.key)
        else:
            shapes.unknown.add(obj.key)  # a shape we do not make: not ours to delete
    return shapes


def _owned(objects: list[StoredObject], uow: UnitOfWork) -> set[str]:
    """The keys among ``objects`` that a row owns (or that are not ours to judge)."""
    shapes = _shapes(objects)
    owned = set(shapes.unknown)
    with uow() as session:
        if shapes.images:
            rows = session.execute(
                sa.select(col(Image.job_id), col(Image.index)).where(
                    col(Image.job_id).in_(sorted({job for job, _ in shapes.images})),
                    col(Image.expired_at).is_(None),
                )
            ).all()
            owned |= {shapes.images[k] for j, i in rows if (k := (str(j), int(i))) in shapes.images}
        if shapes.jobs:
            rows = session.execute(
                sa.select(col(Job.id), col(Job.status)).where(col(Job.id).in_(sorted(shapes.jobs)))
            ).all()
            for job_id, status in rows:
                # Kept upstream images are the job's only until it ends.
                owned |= {
                    key
                    for key in shapes.jobs[str(job_id)]
                    if key.split("/", 3)[2] != "upstream" or status not in FINISHED
                }
        if shapes.files:
            rows = session.execute(
                sa.select(col(File.id)).where(
                    col(File.id).in_(sorted(shapes.files)), col(File.deleted_at).is_(None)
                )
            ).all()
            owned |= {shapes.files[str(f)] for (f,) in rows}
    return owned


def _projects(uow: UnitOfWork) -> list[str]:
    with uow() as session:
        query = sa.select(col(Project.id)).order_by(col(Project.id))
        return [str(p) for p in session.execute(query).scalars()]


def _pages(
    objects: Iterable[StoredObject], sizes: Callable[[], int]
) -> Iterable[list[StoredObject]]:
    """Pages of the objects, each of ``sizes()`` (what is left of the run's limit,
    asked before each page: no object is listed that the run does not examine)."""
    objects = iter(objects)
    while page := list(itertools.islice(objects, sizes())):
        yield page


def sweep_orphans(
    storage: Storage,
    *,
    min_age_seconds: float,
    limit: int,
    now: datetime | None = None,
    uow: UnitOfWork = unit_of_work,
    cursor: Cursor | None = None,
) -> Swept:
    """Examine up to ``limit`` objects from where the last run stopped; delete those
    no row owns that are older than ``min_age_seconds``."""
    now = now or utcnow()
    young = now - timedelta(seconds=min_age_seconds)
    cursor = cursor or Cursor()
    start = cursor.get()
    swept = Swept()
    for project in _projects(uow):
        if start and project < start.split("/", 1)[0]:
            continue
        # Listed from where the last run stopped (S3's StartAfter), not from the
        # project's start: pass k of a large project lists its own stretch only.
        objects = storage.scan(f"{project}/", start_after=start)
        for page in _pages(objects, lambda: min(1000, limit - swept.examined)):
            swept.examined += len(page)
            old = [o for o in page if o.modified < young]
            owned = _owned(old, uow)
            orphans = [o.key for o in old if o.key not in owned]
            if orphans:
                swept.delete_calls += storage.delete(orphans)
                swept.deleted += len(orphans)
            if swept.examined >= limit:
                cursor.set(page[-1].key)
                return swept
    cursor.set("")  # every project done: the next run starts over
    swept.finished_round = True
    return swept
