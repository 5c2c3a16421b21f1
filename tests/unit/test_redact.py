"""No secret in a log line or a database error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared.core.db import make_engine
from shared.core.redact import install, redact


def test_keys_secrets_and_signatures_are_redacted() -> None:
    line = (
        "key sk-ig-AbCdEf0123456789xyz secret whsec_c2VjcmV0LXNlY3JldA== url "
        "http://h/b/k.png?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=abc123&x=1 "
        "/v1/images/files/k.png?expires=9&signature=deadbeef upstream sk-upstream-test"
    )
    out = redact(line)
    for secret in (
        "AbCdEf0123456789xyz",
        "c2VjcmV0LXNlY3JldA",
        "abc123",
        "deadbeef",
        "AKIA",
        "upstream-test",
    ):
        assert secret not in out, secret
    assert "sk-ig-***" in out
    assert "whsec_***" in out
    assert "&x=1" in out
    assert redact("disk-usage-report") == "disk-usage-report"


def test_providers_keys_and_a_sigv4_header_are_redacted() -> None:
    """Issue 27's providers: Replicate and Google keys, and boto3's Authorization
    header for Bedrock (its access key id and signature)."""
    line = (
        "token r8_AbCdEf0123456789 key AIzaSyAbCdEf0123456789 Authorization: "
        "AWS4-HMAC-SHA256 Credential=AKIAFAKEBEDROCKTEST1/20261206/us-east-1/bedrock/"
        "aws4_request, SignedHeaders=host;x-amz-date, Signature=0123abcd"
    )
    out = redact(line)
    for secret in ("AbCdEf0123456789", "AKIAFAKEBEDROCKTEST1", "0123abcd"):
        assert secret not in out, secret
    assert "r8_***" in out
    assert "SignedHeaders=host" in out


def test_log_records_are_redacted_whoever_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    install()
    with caplog.at_level(logging.INFO):
        logging.getLogger("shared.test").info("key %s", "sk-ig-AbCdEf0123456789")
    assert "AbCdEf0123456789" not in caplog.text
    assert "sk-ig-***" in caplog.text
    # uvicorn's access formatter builds its line from the record's arguments, not
    # from the formatted message: the arguments themselves must be clean.
    from uvicorn.logging import AccessFormatter

    record = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/v1/images/files/k.png?expires=9&signature=s3cr3t", "1.1", 200),
        None,
    )
    line = AccessFormatter(
        '%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False
    ).format(record)
    assert "s3cr3t" not in line
    assert "signature=***" in line


def test_a_failed_insert_does_not_carry_its_bound_values(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (secret TEXT UNIQUE)"))
            conn.execute(sa.text("INSERT INTO t VALUES (:s)"), {"s": "whsec_first"})
        with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (:s)"), {"s": "whsec_first"})
        assert "whsec_first" not in str(info.value)
    finally:
        engine.dispose()
