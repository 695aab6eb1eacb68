"""WEBHOOK_ALLOWED_NETWORKS: where webhooks may go, checked before connecting."""

from __future__ import annotations

import pytest

from app.config import SettingsError
from app.webhooks.policy import PolicyError, WebhookPolicy
from tests.conftest import make_settings


class FakeResolver:
    """Answers from a table, as DNS would."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int) -> list[str]:
        if host not in self.table:
            raise OSError("no such host")
        return self.table[host]


DNS = FakeResolver(
    {
        "public.example": ["93.184.216.34"],
        "sneaky.example": ["93.184.216.34", "10.0.0.5"],
        "internal.corp": ["10.1.2.3"],
        "metadata.example": ["169.254.169.254"],
    }
)
POLICY = WebhookPolicy.from_entries(["10.1.0.0/16", "127.0.0.0/8", "hooks.lan"])
EMPTY = WebhookPolicy()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "https://public.example/hook",
        "https://93.184.216.34/hook",
        "http://internal.corp:8080/hook",
        "http://127.0.0.1:9000/hook",
        "http://hooks.lan/hook",
    ],
)
async def test_public_https_and_listed_destinations_pass(url: str) -> None:
    """Public over HTTPS; http:// inside the listed networks or hosts."""
    await POLICY.check(url, DNS if "lan" not in url else FakeResolver({"hooks.lan": ["10.9.9.9"]}))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://public.example/hook", "need https"),
        ("https://sneaky.example/hook", "10.0.0.5"),
        ("https://metadata.example/", "169.254.169.254"),
        ("https://169.254.169.254/latest", "not a public address"),
        ("https://[::1]/hook", "not a public address"),
        ("https://user:pw@public.example/hook", "credentials"),
        ("ftp://public.example/hook", "http:// or https://"),
        ("https://2130706433/hook", "non-canonical"),
        ("https://nowhere.example/hook", "cannot resolve"),
        ("https://public.example/hook#frag", "fragment"),
    ],
)
async def test_everything_else_is_refused_with_a_reason(url: str, reason: str) -> None:
    """Plain HTTP to the internet, private or metadata addresses, credentials, odd hosts."""
    with pytest.raises(PolicyError, match=reason):
        await POLICY.check(url, DNS)


@pytest.mark.asyncio
async def test_loopback_is_refused_unless_listed() -> None:
    """127.0.0.1 needs 127.0.0.0/8 in the list, even over HTTPS."""
    with pytest.raises(PolicyError, match="WEBHOOK_ALLOWED_NETWORKS"):
        await EMPTY.check("https://127.0.0.1/hook", DNS)
    await POLICY.check("https://127.0.0.1/hook", DNS)


def test_connections_are_judged_per_scheme_and_address() -> None:
    """The connect-time rule: listed for http, listed or public for https."""
    assert POLICY.may_connect("http", "x", "10.1.9.9")
    assert not POLICY.may_connect("http", "x", "93.184.216.34")
    assert POLICY.may_connect("https", "x", "93.184.216.34")
    assert not POLICY.may_connect("https", "x", "192.168.1.1")
    assert POLICY.may_connect("http", "hooks.lan", "192.168.1.1")


def test_a_bad_entry_is_refused_at_start(tmp_path: object) -> None:
    """An entry that is neither a network nor a host name stops the service from starting."""
    with pytest.raises(SettingsError, match="WEBHOOK_ALLOWED_NETWORKS"):
        make_settings(
            "sqlite+aiosqlite:///x.db",
            tmp_path,  # type: ignore[arg-type]
            webhook_allowed_networks="10.0.0.0/8,http://x/y",
        )
