"""The retry schedule, Retry-After and what an answer means."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.config import SettingsError
from app.webhooks.delivery import MAX_BODY_BYTES, judge, next_delay, webhook_body
from tests.conftest import make_settings

SVIX = [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


def test_the_default_schedule_is_svixs(tmp_path: object) -> None:
    """Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    settings = make_settings("sqlite+aiosqlite:///x.db", tmp_path)  # type: ignore[arg-type]
    assert settings.webhook_delays == SVIX


def test_each_failure_waits_the_next_delay_then_gives_up() -> None:
    """After n failed attempts the next waits SVIX[n]; after all eight, none."""
    assert [next_delay(SVIX, n) for n in range(1, 8)] == SVIX[1:]
    assert next_delay(SVIX, 8) is None


def test_retry_after_is_honoured_when_longer_and_bounded() -> None:
    """A longer Retry-After wins, a shorter one does not shorten the wait, a huge one is capped."""
    assert next_delay(SVIX, 1, retry_after=60) == 60
    assert next_delay(SVIX, 2, retry_after=1) == 300
    assert next_delay(SVIX, 1, retry_after=10**9) == 36000


def test_answers_are_judged() -> None:
    """2xx delivers; 3xx is a failure (never followed); Retry-After counts on 429 and 503 only."""
    assert judge(204, None) == (None, None)
    error, wait = judge(302, "5")
    assert error is not None
    assert "redirect" in error
    assert wait is None
    assert judge(429, "7") == ("answered 429", 7.0)
    assert judge(503, "3") == ("answered 503", 3.0)
    assert judge(500, "3") == ("answered 500", None)


@pytest.mark.parametrize("schedule", ["", "5,x", "-1", "nan"])
def test_a_bad_schedule_is_refused_at_start(tmp_path: object, schedule: str) -> None:
    """WEBHOOK_RETRY_SCHEDULE must be delays of zero seconds or more."""
    with pytest.raises(SettingsError, match="WEBHOOK_RETRY_SCHEDULE"):
        make_settings(
            "sqlite+aiosqlite:///x.db",
            tmp_path,  # type: ignore[arg-type]
            webhook_retry_schedule=schedule,
        )


def test_a_huge_prompt_is_cut_so_the_body_stays_under_20_kb() -> None:
    """A 32 000-character prompt is shortened and marked; small bodies are untouched."""
    now = datetime.now(UTC)
    data = {"id": "tsk_1", "prompt": "é" * 32000, "images": [], "image": None}
    body = webhook_body("evt_1", "task.failed", now, data, "https://x.test")
    assert len(body) < MAX_BODY_BYTES
    assert b'"prompt_truncated":true' in body
    small = webhook_body("evt_1", "task.failed", now, {**data, "prompt": "a cat"}, "")
    assert b"prompt_truncated" not in small
    assert b'"prompt":"a cat"' in small
