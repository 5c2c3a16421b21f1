"""The purge's periodic pass: what the ``imagegen.purge`` task runs, and when the
sweeper publishes it."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime

from shared.core.context import current
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.retention.orphans import Swept, sweep_orphans
from shared.retention.purge import Purged, purge_once

log = logging.getLogger(__name__)

DUE_KEY = "imagegen:purge:due"
RUNNING_KEY = "imagegen:purge:running"
# Delete the lease only if it is still this pass's (its token): a pass that ran
# past its lease must not release the lease of the pass that took over.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# The first pass one interval after the process starts (a fleet restarting at once
# does not purge at once); then every interval.
_last_published = time.monotonic()


def run_purge(now: datetime | None = None) -> tuple[Purged, Swept] | None:
    """One pass: what is past its time, then a bounded stretch of the orphan scan.
    With Redis, one pass at a time across the fleet (a second finds it running and
    returns None); the purge is safe twice at once, this only saves the work."""
    settings = get_settings()
    redis = current().redis
    lease = int(max(settings.purge_interval_seconds, 60) * 4)
    token = secrets.token_hex(16)
    if redis is not None and not redis.set(RUNNING_KEY, token, nx=True, ex=lease):
        return None
    try:
        storage = get_storage()
        purged = purge_once(storage, now, duty=settings.purge_duty_cycle)
        swept = sweep_orphans(
            storage,
            min_age_seconds=settings.orphan_min_age_seconds,
            limit=settings.orphan_scan_limit,
            now=now,
        )
        if swept.deleted:
            log.info("orphans: %d deleted of %d examined", swept.deleted, swept.examined)
        return purged, swept
    finally:
        if redis is not None:
            redis.eval(_RELEASE, 1, RUNNING_KEY, token)


def purge_due() -> bool:
    """Whether this sweeper should publish the purge now: every
    ``purge_interval_seconds``, once across every sweeper where Redis says so."""
    global _last_published
    settings = get_settings()
    interval = settings.purge_interval_seconds
    if time.monotonic() - _last_published < interval:
        return False
    _last_published = time.monotonic()
    redis = current().redis
    if redis is None:
        return True
    return bool(redis.set(DUE_KEY, b"1", nx=True, ex=max(1, int(interval))))
