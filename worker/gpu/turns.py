"""Fair share on a device (issue 30): the order waiting jobs are served in, and the
jobs one pipeline call takes. Pure: no clock, no I/O.

Order: interactive jobs (no batch) before batch lines; within each, projects take
turns: every project's first waiting job, then every project's second, and so on,
the project served longest ago first among equals, then by arrival. So one
project's 10,000-line batch holds another project's request back by one call at
most, and a project with many requests waiting gets one turn a round, not the
device.

A call takes the first job in that order (the head) and, after it, every job
further down whose plan is the head's (the same model and settings: they can share
one pipeline call) while their images fit the model's ``max_batch_images``. A job
that does not fit waits for a later call, where it may be the head: no job ever
waits for a call it cannot join. A head with more images than a call holds runs
alone, in as many calls as it needs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """A job waiting for the device."""

    job_id: str  # time-ordered (uuid7): the arrival order
    project_id: str
    interactive: bool  # not a batch line
    plan: Hashable  # equal plans may share a call
    images: int
    room: int  # its model's max_batch_images


def fair_order(waiting: Sequence[Waiting], served: Mapping[str, int]) -> list[Waiting]:
    """``waiting`` in the order they are served; ``served``: each project's last
    turn (a call number; a project never served counts as -1)."""
    seen: dict[tuple[bool, str], int] = {}
    keyed = []
    for job in sorted(waiting, key=lambda w: w.job_id):
        rank = seen.get((job.interactive, job.project_id), 0)
        seen[(job.interactive, job.project_id)] = rank + 1
        keyed.append(((not job.interactive, rank, served.get(job.project_id, -1), job.job_id), job))
    keyed.sort(key=lambda pair: pair[0])
    return [job for _, job in keyed]


def next_call(ordered: Sequence[Waiting]) -> list[Waiting]:
    """The jobs the next call takes, from ``ordered`` (fair_order's)."""
    if not ordered:
        return []
    head = ordered[0]
    left = head.room - head.images
    taken = [head]
    for job in ordered[1:]:
        if left <= 0:
            break
        if job.plan == head.plan and job.images <= left:
            taken.append(job)
            left -= job.images
    return taken
