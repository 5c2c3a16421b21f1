"""How long things live: the pure rules the edge, the views and the purge share.

An image lives until the earliest of its job's own end (``Image-Expires-After``,
counted from the request: ``job.images_expire_at``) and its project's image
retention counted from when it was made; null retention is forever. Nothing here
reads the database or the clock: callers pass ``now``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from shared.core.durations import parse_duration
from shared.core.errors import InvalidRequest

IMAGE_EXPIRES_HEADER = "Image-Expires-After"
# A request may ask for as little as a minute (a URL is presigned for a while) and
# at most a year (longer is capped at the project's retention anyway).
LEAST_IMAGE_LIFE = 60.0
MOST_LIFE = 366 * 86400.0
# OpenAI's bounds for a file's expires_after[seconds] (one hour to 30 days).
FILE_LEAST = 3600
FILE_MOST = 2592000


def request_image_life(header: str | None, retention_seconds: int | None) -> float | None:
    """The life a request's ``Image-Expires-After`` asks for its images, in seconds,
    capped (not refused) at the project's image retention; None without the header."""
    if header is None:
        return None
    seconds = parse_duration(
        header, what=IMAGE_EXPIRES_HEADER, least=LEAST_IMAGE_LIFE, most=MOST_LIFE
    )
    if retention_seconds is not None:
        seconds = min(seconds, float(retention_seconds))
    return seconds


def images_expire_at(now: datetime, life: float | None) -> datetime | None:
    return None if life is None else now + timedelta(seconds=life)


def image_ends_at(
    job_images_expire_at: datetime | None,
    image_created_at: datetime | None,
    retention_seconds: int | None,
) -> datetime | None:
    """When an image's time is up (None: never)."""
    ends = [job_images_expire_at] if job_images_expire_at is not None else []
    if retention_seconds is not None and image_created_at is not None:
        ends.append(image_created_at + timedelta(seconds=retention_seconds))
    return min(ends) if ends else None


def url_life(ends_at: datetime | None, now: datetime, url_expiry: int) -> int:
    """A presigned URL's life: the configured expiry, capped at what is left of the
    image's (at least a second; an image already past its time is not linked)."""
    if ends_at is None:
        return url_expiry
    left = math.floor((ends_at - now).total_seconds())
    return max(1, min(url_expiry, left))


def file_expires_at(
    created_at: datetime, expires_after: int | None, retention_seconds: int | None
) -> datetime | None:
    """A file's ``expires_at``: its own ``expires_after`` (OpenAI's, from its
    creation), else its project's file retention; the earlier where both."""
    lives = [s for s in (expires_after, retention_seconds) if s is not None]
    return created_at + timedelta(seconds=min(lives)) if lives else None


def file_expires_after(anchor: str | None, seconds: str | None) -> int | None:
    """OpenAI's ``expires_after`` on ``POST /v1/files`` (multipart fields
    ``expires_after[anchor]`` and ``expires_after[seconds]``): both or neither; the
    anchor ``created_at``; 3600 to 2592000 seconds. Errors name the field."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'.", param="expires_after.anchor"
        )
    try:
        value = int(seconds or "")
    except ValueError:
        value = None
    if value is None or not FILE_LEAST <= value <= FILE_MOST:
        raise InvalidRequest(
            f"expires_after[seconds] must be an integer between {FILE_LEAST} and {FILE_MOST}.",
            param="expires_after.seconds",
        )
    return value


_DAYS = re.compile(r"(\d+)d(.*)")


def parse_retention(text: str, *, what: str) -> int | None:
    """A retention as an operator writes it (the CLI): ``forever`` (or ``none``) for
    null, else a duration in Go's grammar with days allowed in front (``30d``,
    ``7d12h``, ``3600``), in whole seconds, at least a minute."""
    value = text.strip().lower()
    if value in ("forever", "none", "null"):
        return None
    days = 0.0
    if match := _DAYS.fullmatch(value):
        days, value = float(match.group(1)), match.group(2)
    rest = parse_duration(value, what=what, most=MOST_LIFE * 100) if value else 0.0
    seconds = int(days * 86400 + rest)
    if not 60 <= seconds <= RETENTION_MOST:
        raise InvalidRequest(f"{what}: {text!r} must be between 1 minute and 68 years", param=what)
    return seconds


# Retention columns are SQL INTEGER: up to 2^31-1 seconds (68 years); 100 years as
# the parser says is refused by the schema's bound, so the parser keeps within it.
RETENTION_MOST = 2**31 - 1
