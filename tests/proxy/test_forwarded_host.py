"""X-Forwarded-Host and X-Forwarded-Port: believed from trusted proxies only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from app.middleware import TrustedPeers
from tests.conftest import API_TOKEN, Service, make_settings
from tests.helpers import simulator_transport

ASYNC = pytest.mark.asyncio(loop_scope="session")


async def submit_from(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    peer: str,
    headers: dict[str, str],
    **overrides: Any,
) -> httpx.Response:
    """POST /tasks as if sent by `peer` with these headers, to a service trusting 127.0.0.1."""
    transport, _ = simulator_transport()
    settings = make_settings(sqlite_url, tmp_path, trusted_proxies="127.0.0.1", **overrides)
    service: Service = await service_factory(settings, transport)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, client=(peer, 5000)),
        base_url="http://imagetasks.internal",
        headers={"Authorization": f"Bearer {API_TOKEN}", **headers},
    )
    async with client:
        return await client.post("/tasks", json={"prompt": "p"})


@pytest.mark.parametrize(
    ("headers", "origin"),
    [
        ({"X-Forwarded-Host": "api.example.com:8443"}, "http://api.example.com:8443"),
        (
            {"X-Forwarded-Host": "api.example.com", "X-Forwarded-Port": "8080"},
            "http://api.example.com:8080",
        ),
        ({"X-Forwarded-Port": "8080"}, "http://imagetasks.internal:8080"),
        (
            {
                "X-Forwarded-Host": "api.example.com",
                "X-Forwarded-Port": "443",
                "X-Forwarded-Proto": "https",
            },
            "https://api.example.com",
        ),
        ({"X-Forwarded-Host": "[2001:db8::1]:9000"}, "http://[2001:db8::1]:9000"),
        ({"X-Forwarded-Host": "spoofed.example, api.example.com:81"}, "http://api.example.com:81"),
    ],
)
@ASYNC
async def test_a_trusted_proxy_sets_the_host_and_port_of_generated_urls(
    service_factory: Any, sqlite_url: str, tmp_path: Path, headers: dict[str, str], origin: str
) -> None:
    """Location carries the forwarded host and port (the last value, the nearest proxy's)."""
    response = await submit_from(service_factory, sqlite_url, tmp_path, "127.0.0.1", headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"{origin}/tasks/{response.json()['id']}"


@ASYNC
async def test_an_untrusted_peer_cannot_move_generated_urls(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """From a peer not in TRUSTED_PROXIES the forwarded host and port are ignored."""
    headers = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "6666"}
    response = await submit_from(service_factory, sqlite_url, tmp_path, "10.1.2.3", headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"].startswith("http://imagetasks.internal/tasks/")


@ASYNC
async def test_the_forwarded_host_keeps_the_path_prefix(
    service_factory: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """With ROOT_PATH the generated URL has the forwarded origin and the prefix."""
    headers = {"X-Forwarded-Host": "api.example.com:8443"}
    response = await submit_from(
        service_factory, sqlite_url, tmp_path, "127.0.0.1", headers, root_path="/imagetasks"
    )
    assert response.headers["location"] == (
        f"http://api.example.com:8443/imagetasks/tasks/{response.json()['id']}"
    )


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"X-Forwarded-Host": "api.example.com/evil"}, "X-Forwarded-Host"),
        ({"X-Forwarded-Host": "api.example.com:99999"}, "X-Forwarded-Host"),
        ({"X-Forwarded-Host": ""}, "X-Forwarded-Host"),
        ({"X-Forwarded-Port": "http"}, "X-Forwarded-Port"),
        ({"X-Forwarded-Port": "0"}, "X-Forwarded-Port"),
        ({"X-Forwarded-Port": "8\u00b2".encode("latin-1")}, "X-Forwarded-Port"),
    ],
)
@ASYNC
async def test_a_malformed_forwarded_value_is_refused_and_changes_nothing(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    headers: dict[str, str | bytes],
    named: str,
) -> None:
    """A trusted proxy's bad value is a 400 naming the header, logged; no task is created."""
    transport, _ = simulator_transport()
    settings = make_settings(sqlite_url, tmp_path, trusted_proxies="127.0.0.1")
    service: Service = await service_factory(settings, transport)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, client=("127.0.0.1", 5000)),
        base_url="http://imagetasks.internal",
        headers={"Authorization": f"Bearer {API_TOKEN}", **headers},
    )
    async with client:
        with capture_logs() as logs:
            response = await client.post("/tasks", json={"prompt": "p"})
    assert response.status_code == 400
    warned = [line for line in logs if line["event"] == "bad_forwarded_header"]
    assert warned == [
        {
            "event": "bad_forwarded_header",
            "log_level": "warning",
            "proxy": "127.0.0.1",
            "header": named,
        }
    ]
    assert response.json()["error"]["code"] == "bad_forwarded_header"
    assert named in response.json()["error"]["message"]
    assert await service.sql("SELECT id FROM tasks") == []


def test_trusted_peers_read_addresses_networks_names_and_star() -> None:
    """TRUSTED_PROXIES entries match like uvicorn's: IPs, CIDR networks, names, "*"."""
    peers = TrustedPeers(["127.0.0.1", "10.0.0.0/8", "::1", "unix-socket"])
    assert "127.0.0.1" in peers
    assert "10.200.3.4" in peers
    assert "::1" in peers
    assert "unix-socket" in peers
    assert "127.0.0.2" not in peers
    assert "192.168.0.1" not in peers
    assert "not-an-ip" not in peers
    assert "8.8.8.8" in TrustedPeers("*")
    assert "8.8.8.8" not in TrustedPeers("")
