"""What a published message carries, read back from the embedded broker's folder."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from shared.core.broker import MAX_COUNTDOWN_SECONDS, publish_job
from shared.core.clock import utcnow
from shared.core.settings import get_settings
from tests.service.conftest import Service


def test_a_long_countdown_is_cut_to_the_longest_a_broker_holds(service: Service) -> None:
    """A job whose upstream asks for an hour comes back in 10 min: on RabbitMQ the
    consumer holds a countdown message unacked until it is due, and past the
    broker's consumer_timeout (30 min) Celery stops the whole consumer."""
    queue = "countdown-cap"  # no consumer: the message stays where it was written
    before = utcnow()
    assert publish_job("job_countdown_cap", queue, countdown=3600)
    [path] = (get_settings().broker_dir / "queue").glob(f"*.{queue}.msg")
    eta = datetime.fromisoformat(json.loads(path.read_text())["headers"]["eta"])
    assert timedelta(0) < eta - before <= timedelta(seconds=MAX_COUNTDOWN_SECONDS + 5)
    assert eta - before >= timedelta(seconds=MAX_COUNTDOWN_SECONDS - 5)
    path.unlink()
