"""Budgets (issue 26): a request's estimated cost, and the periods it is counted in
(the Redis side is in tests/service/test_budgets.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.jobs.schemas import GenerationParams
from shared.projects.budgets import Budget, estimate, output_tokens, to_micro
from shared.registry import Price, ProceduralModel

CAPS = {"sizes": ["1024x1024", "1536x1024", "256x256"], "max_n": 10}


def _spec(price: Price | None, upstream_max_n: int | None = None) -> ProceduralModel:
    caps = {**CAPS, "upstream_max_n": upstream_max_n} if upstream_max_n else CAPS
    return ProceduralModel(name="m", capabilities=caps, price=price)  # type: ignore[arg-type]


def _params(n: int = 1, size: str = "1024x1024", quality: str | None = None) -> GenerationParams:
    return GenerationParams(model="m", prompt="a" * 40, n=n, size=size, quality=quality)


def test_an_image_priced_model_costs_its_price_times_n() -> None:
    spec = _spec(Price(per_image=0.04, per_image_by={"1024x1024/low": 0.011, "256x256": 0.02}))
    assert estimate(spec, _params(3)) == pytest.approx(0.12)
    assert estimate(spec, _params(2, quality="low")) == pytest.approx(0.022)
    assert estimate(spec, _params(2, size="256x256", quality="high")) == pytest.approx(0.04)


def test_a_model_without_a_price_costs_nothing() -> None:
    assert estimate(_spec(None), _params(10)) == 0.0
    assert estimate(_spec(Price(per_image_by={"256x256": 0.02})), _params(2)) == 0.0


def test_a_token_priced_model_counts_openais_output_tokens_per_image() -> None:
    price = Price(per_token={"input": 5e-6, "output": 4e-5})  # type: ignore[arg-type]
    # 40 characters of prompt: 10 input tokens per upstream call.
    low = estimate(_spec(price), _params(2, quality="low"))
    assert low == pytest.approx(10 * 5e-6 + 2 * 272 * 4e-5)
    # One image per upstream call: the prompt is sent twice.
    fanned = estimate(_spec(price, upstream_max_n=1), _params(2, "1536x1024", "medium"))
    assert fanned == pytest.approx(2 * 10 * 5e-6 + 2 * 1568 * 4e-5)


def test_output_tokens_never_fall_short() -> None:
    assert output_tokens("1024x1536", "high") == 6240
    assert output_tokens("1024x1024", None) == 4160  # no quality: high
    assert output_tokens("1024x1024", "auto") == 4160
    assert output_tokens("auto", "medium") == 1584  # the largest of the quality
    assert output_tokens("512x512", "low") == 68  # the square's, by area
    assert output_tokens("64x64", "high") == 17  # rounded up


def test_amounts_round_up_to_whole_micro_usd() -> None:
    assert to_micro(0.01) == 10_000
    assert to_micro(1e-7) == 1
    assert to_micro(0.0) == 0


def test_periods_are_utc_days_and_months() -> None:
    late = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    day, month = Budget("project", "p1", "day", 1.0), Budget("key", "k1", "month", 1.0)
    assert day.counter(late) == "imagegen:budget:project:p1:day:20261231"
    assert month.counter(late) == "imagegen:budget:key:k1:month:202612"
    assert day.bounds(late) == (late.replace(hour=0, minute=0), datetime(2027, 1, 1, tzinfo=UTC))
    assert month.bounds(late)[0] == datetime(2026, 12, 1, tzinfo=UTC)
    refusal = month.refusal(late, 0.5, 0.75)
    assert (refusal.status_code, refusal.code, refusal.error_type) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert refusal.retry_after == 60
    assert refusal.should_retry is False
