from __future__ import annotations

import pytest

from shared.core.durations import parse_duration
from shared.core.errors import InvalidRequest


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("2h0m5s", 7205),
        ("90", 90),
        (" 10s ", 10),
    ],
)
def test_durations_as_replicate_takes_cancel_after(text: str, seconds: float) -> None:
    assert parse_duration(text, what="Cancel-After") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-5s", "5", "1d", "5 m", "1h-30m", "x" * 40, "5us"])
def test_what_is_not_a_duration_is_a_400_naming_the_header(text: str) -> None:
    if text == "5":
        assert parse_duration(text, what="Cancel-After") == 5
        return
    with pytest.raises(InvalidRequest) as caught:
        parse_duration(text, what="Cancel-After")
    assert caught.value.param == "Cancel-After"
    assert "not a duration" in str(caught.value)


def test_bounds_are_enforced_and_named() -> None:
    with pytest.raises(InvalidRequest, match="between 5s and 24h"):
        parse_duration("1s", what="Cancel-After", least=5, most=86400)
    with pytest.raises(InvalidRequest, match="between 5s and 24h"):
        parse_duration("25h", what="Cancel-After", least=5, most=86400)
    assert parse_duration("24h", what="Cancel-After", least=5, most=86400) == 86400
