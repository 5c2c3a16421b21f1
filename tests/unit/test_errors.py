"""The error tree: one renderer, and how a failed job answers a waiting request."""

from __future__ import annotations

import pytest

from shared.core.errors import (
    ClientError,
    ErrorCode,
    InternalError,
    InvalidRequest,
    ProviderError,
    RateLimited,
    StorageUnavailable,
    render,
)
from shared.jobs.models import Job, JobStatus
from shared.jobs.views import job_failure


def test_render_is_openai_error_object() -> None:
    body = render(RateLimited("slow down", retry_after=3))
    assert body.model_dump() == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_two_branches_under_one_root() -> None:
    assert issubclass(InvalidRequest, ClientError)
    assert issubclass(ProviderError, InternalError)
    assert issubclass(StorageUnavailable, InternalError)
    assert not issubclass(ProviderError, ClientError)


def job(status: JobStatus, code: str | None = None) -> Job:
    return Job(
        project_id="p",
        model="m",
        request={},
        status=status,
        error_code=code,
        error_message="why",
    )


@pytest.mark.parametrize(
    ("status", "code", "http", "answer_code"),
    [
        (JobStatus.failed, ErrorCode.upstream_timeout, 504, "upstream_timeout"),
        (JobStatus.failed, ErrorCode.upstream_rate_limited, 429, "upstream_rate_limited"),
        (JobStatus.failed, ErrorCode.upstream_unavailable, 502, "upstream_unavailable"),
        (JobStatus.failed, ErrorCode.internal_error, 500, "internal_error"),
        (JobStatus.failed, "content_policy_violation", 400, "content_policy_violation"),
        (JobStatus.failed, ErrorCode.model_unavailable, 503, "model_unavailable"),
        (JobStatus.failed, ErrorCode.out_of_memory, 400, "out_of_memory"),
        (JobStatus.canceled, None, 409, "job_canceled"),
    ],
)
def test_a_failed_job_answers_with_its_status(
    status: JobStatus, code: str | None, http: int, answer_code: str
) -> None:
    err = job_failure(job(status, code))
    assert err.status_code == http
    assert render(err).code == answer_code
    # Only what the prompt itself caused names the prompt.
    assert (render(err).param == "prompt") == (answer_code == "content_policy_violation")


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u:p@db:5432/imagegen", "postgresql+psycopg://u:p@db:5432/imagegen"),
        ("postgres://u@db/imagegen", "postgresql+psycopg://u@db/imagegen"),
        ("postgresql+psycopg://u@db/x", "postgresql+psycopg://u@db/x"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_a_postgresql_url_without_a_driver_uses_psycopg(given: str, used: str) -> None:
    from shared.core.settings import Settings

    assert Settings(database_url=given).resolved_database_url == used
