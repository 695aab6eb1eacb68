"""Callback URLs and their tokens, including secret rotation."""

from __future__ import annotations

import pytest

from app.callback_urls import callback_url, sign, verify
from tests.helpers import NEAR_MISS_KINDS, near_miss_token

OLD, NEW = "old-secret-0123456789", "new-secret-9876543210"


def test_url_carries_the_prefix_the_task_and_its_token() -> None:
    """The URL is PUBLIC_BASE_URL (path prefix kept) plus our id and token."""
    url = callback_url("https://hooks.example.com/imagetasks/", "tsk_1", OLD)
    assert (
        url == f"https://hooks.example.com/imagetasks/webhooks/starmagic/tsk_1/{sign('tsk_1', OLD)}"
    )


def test_tokens_differ_per_task_and_per_secret() -> None:
    """A token proves one task under one secret."""
    assert sign("tsk_1", OLD) != sign("tsk_2", OLD)
    assert sign("tsk_1", OLD) != sign("tsk_1", NEW)
    assert not verify("tsk_2", sign("tsk_1", OLD), [OLD])


def test_rotation_keeps_old_urls_working_until_the_old_secret_is_removed() -> None:
    """First secret signs, all verify; dropping the old one retires its URLs."""
    issued_before = sign("tsk_1", OLD)
    assert verify("tsk_1", issued_before, [NEW, OLD])
    assert verify("tsk_1", sign("tsk_1", NEW), [NEW, OLD])
    assert not verify("tsk_1", issued_before, [NEW])


@pytest.mark.parametrize("token", ["", "0" * 32, "ZZZ", "é" * 32])
def test_garbage_tokens_never_verify(token: str) -> None:
    """Empty, wrong or non-ASCII tokens are refused without error."""
    assert not verify("tsk_1", token, [OLD])


def test_overlong_callback_urls_are_refused() -> None:
    """The provider takes at most 2048 characters."""
    with pytest.raises(ValueError, match="2048"):
        callback_url("https://h.example.com/" + "p" * 2100, "tsk_1", OLD)


@pytest.mark.parametrize("kind", NEAR_MISS_KINDS)
def test_near_miss_tokens_never_verify(kind: str) -> None:
    """Every character of the token counts, under every configured secret."""
    valid = sign("tsk_1", NEW)
    token = near_miss_token(
        kind, valid, other_task=sign("tsk_2", NEW), retired=sign("tsk_1", "retired-secret-0000")
    )
    assert token != valid
    assert not verify("tsk_1", token, [NEW, OLD])
    assert verify("tsk_1", valid, [NEW, OLD])


def test_tokens_are_32_hex_characters() -> None:
    """A token is the first 32 hex digits of the HMAC: short enough for a path, long enough."""
    token = sign("tsk_1", OLD)
    assert len(token) == 32
    assert int(token, 16) >= 0


@pytest.mark.parametrize(
    "base",
    ["https://h.example.com/boX", "https://h.example.com/boX/", "https://h.example.com/boX//"],
)
def test_only_trailing_slashes_of_the_base_are_dropped(base: str) -> None:
    """The base URL keeps every character but its trailing slashes."""
    assert callback_url(base, "tsk_1", OLD).startswith("https://h.example.com/boX/webhooks/")


def test_a_callback_url_of_exactly_the_limit_is_accepted() -> None:
    """2048 characters is allowed; one more is refused."""
    tail = len(f"/webhooks/starmagic/tsk_1/{sign('tsk_1', OLD)}")
    base = "https://h.example.com/"
    fitting = base + "p" * (2048 - tail - len(base))
    assert len(callback_url(fitting, "tsk_1", OLD)) == 2048
    with pytest.raises(ValueError, match="2048"):
        callback_url(fitting + "p", "tsk_1", OLD)
