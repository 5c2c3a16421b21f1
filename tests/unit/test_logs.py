"""Log lines carry the context they were written in; JSON when asked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from shared.core.logs import bind, configure
from shared.core.settings import Settings


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def use(fmt: str, out: io.StringIO) -> None:
    configure(Settings(log_format=fmt))  # type: ignore[arg-type]
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)


def test_json_lines_carry_the_bound_job_and_request(captured: io.StringIO) -> None:
    use("json", captured)
    with bind(job_id="job_1", project="proj_1", request_id="req_1"):
        logging.getLogger("imagegen.test").warning("stored %d images", 2)
    logging.getLogger("imagegen.test").warning("outside")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["message"] == "stored 2 images"
    assert (first["job_id"], first["project"], first["request_id"]) == ("job_1", "proj_1", "req_1")
    assert first["level"] == "WARNING"
    assert second["job_id"] is None


def test_text_lines_name_the_context_after_the_message(captured: io.StringIO) -> None:
    use("text", captured)
    with bind(job_id="job_9", batch_id="batch_3"):
        logging.getLogger("imagegen.test").warning("retrying")
    assert captured.getvalue().rstrip().endswith("retrying job_id=job_9 batch_id=batch_3")
