"""Security through the real processes: bearer tokens on every API route, rotation of
the webhook secret across two replicas, and the SSRF table through the real worker."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.callback_urls import sign
from tests.chaos.cluster import SECOND_TOKEN, WEBHOOK_SECRET, Cluster
from tests.chaos.conftest import ClusterPool, Figures
from tests.e2e.stack import API_TOKEN
from tests.test_fetch import HOSTILE_URLS

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

WAITING_PROMPT = "a slow fresco [sim:eta=50000]"  # 1000 s: never finished here


def bad_credentials(callback_token: str) -> dict[str, dict[str, str]]:
    """Requests that carry no valid bearer token, by name: headers (and cookies/query)."""
    basic = base64.b64encode(f"user:{API_TOKEN}".encode()).decode()
    return {
        "no header": {},
        "scheme only": {"Authorization": "Bearer"},
        "wrong token": {"Authorization": "Bearer not-the-token-0123456789"},
        "token prefix": {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
        "token plus a byte": {"Authorization": f"Bearer {API_TOKEN}x"},
        "token upper-cased": {"Authorization": f"Bearer {API_TOKEN.upper()}"},
        "two tokens": {"Authorization": f"Bearer {API_TOKEN},{SECOND_TOKEN}"},
        "basic auth": {"Authorization": f"Basic {basic}"},
        "other scheme": {"Authorization": f"Token {API_TOKEN}"},
        "token without scheme": {"Authorization": API_TOKEN},
        "webhook secret": {"Authorization": f"Bearer {WEBHOOK_SECRET}"},
        "callback token": {"Authorization": f"Bearer {callback_token}"},
        "token in another header": {"X-Api-Key": API_TOKEN},
        "token as a cookie": {"Cookie": f"token={API_TOKEN}; access_token={API_TOKEN}"},
    }


def api_routes(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (method, path) of the live schema under /tasks and /events."""
    return sorted(
        (method.upper(), path)
        for path, operations in openapi["paths"].items()
        if path.startswith(("/tasks", "/events"))
        for method in operations
    )


@pytest_asyncio.fixture(loop_scope="session")
async def guarded(clusters: ClusterPool) -> AsyncIterator[Cluster]:
    """A one-replica cluster."""
    yield await clusters.start("postgres", replicas=1, RECONCILE_AFTER_SECONDS=600)


async def test_no_api_call_without_a_valid_token_succeeds(
    guarded: Cluster, figures: Figures
) -> None:
    """Every /tasks and /events route, 28 kinds of missing or wrong credentials: 401, and
    nothing changes."""
    cluster = guarded
    stored = await cluster.submit("a stored picture")
    broken = await cluster.submit("a broken picture [sim:not_image]")
    await cluster.wait_image(stored["id"], timeout=60)
    failed = await cluster.wait_image(broken["id"], timeout=60)
    assert failed["image"]["status"] == "failed"
    openapi = (await cluster.client.get("/openapi.json")).json()
    routes = api_routes(openapi)
    # Every route under /tasks and /events is attacked, whatever it is; these must be among them.
    assert {("POST", "/tasks"), ("GET", "/tasks/{task_id}"), ("GET", "/tasks")} <= set(routes)
    assert {("GET", "/events"), ("GET", "/events/stream")} <= set(routes)
    before = await cluster.table("tasks")
    submits = (await cluster.sim.stats())["submit_requests"]
    ids = {"stored": stored["id"], "broken": broken["id"]}
    refused = 0
    token = sign(stored["id"], WEBHOOK_SECRET)
    async with httpx.AsyncClient(base_url=cluster.service_url, trust_env=False) as anonymous:
        for method, template in routes:
            task_id = ids["broken" if template.endswith("/retry") else "stored"]
            path = template.replace("{task_id}", task_id).replace("{index}", "0")
            body = {"prompt": "unauthorised"} if template == "/tasks" else None
            for name, headers in bad_credentials(token).items():
                for query in ({}, {"access_token": API_TOKEN, "token": API_TOKEN}):
                    response = await anonymous.request(
                        method, path, headers=headers, params=query, json=body
                    )
                    assert response.status_code == 401, (method, template, name)
                    refused += 1
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    assert response.json()["error"]["code"] == "unauthorized"
            for good in (API_TOKEN, SECOND_TOKEN):  # the control: a valid token passes
                check = await anonymous.get(
                    f"/tasks/{stored['id']}", headers={"Authorization": f"Bearer {good}"}
                )
                assert check.status_code == 200
    assert await cluster.table("tasks") == before
    assert (await cluster.sim.stats())["submit_requests"] == submits
    credentials = len(bad_credentials(token)) * 2  # each also with the token in the query
    figures.record("auth", routes=len(routes), credentials=credentials, refused_requests=refused)


# -- webhook secret rotation ----------------------------------------------------------

OLD = WEBHOOK_SECRET
NEW = "chaos-rotated-secret-" + base64.b32encode(bytes(range(10))).decode().lower()


async def deliver(cluster: Cluster, upstream: str, progress: int, times: int = 2) -> list[int]:
    """Send ``times`` processing snapshots to the task's callback URL as the provider knows
    it (the forwarder alternates replicas); the status codes."""
    codes = []
    for step in range(times):
        answer = await cluster.sim.callback(upstream, status="processing", progress=progress + step)
        codes += [attempt["status_code"] for attempt in answer["attempts"]]
    return codes


async def rotate(cluster: Cluster, secrets: str) -> None:
    """A rolling restart of every replica with WEBHOOK_SECRET=``secrets``."""
    for index in range(len(cluster.replicas)):
        await cluster.restart_gracefully(index, WEBHOOK_SECRET=secrets)


async def waiting_task(cluster: Cluster) -> tuple[str, str]:
    """A task the provider will not finish during the test: (our id, the provider's id)."""
    task = await cluster.submit(WAITING_PROMPT)
    return task["id"], task["upstream_task_id"]


async def test_callback_urls_survive_a_secret_rotation_until_the_old_secret_goes(
    clusters: ClusterPool, figures: Figures
) -> None:
    """Add the new secret, sign with it, drop the old: old URLs work until the last step."""
    cluster = await clusters.start("postgres", replicas=2, RECONCILE_AFTER_SECONDS=600)
    old_id, old_upstream = await waiting_task(cluster)
    stages: dict[str, dict[str, list[int]]] = {}

    await rotate(cluster, f"{OLD},{NEW}")  # step 1: every replica verifies both
    stages["old,new"] = {"old URL": await deliver(cluster, old_upstream, 20)}

    await rotate(cluster, f"{NEW},{OLD}")  # step 2: sign with the new one
    new_id, new_upstream = await waiting_task(cluster)
    stages["new,old"] = {
        "old URL": await deliver(cluster, old_upstream, 40),
        "new URL": await deliver(cluster, new_upstream, 40),
    }

    await rotate(cluster, NEW)  # step 3: the old secret is gone
    stages["new"] = {
        "old URL": await deliver(cluster, old_upstream, 60),
        "new URL": await deliver(cluster, new_upstream, 60),
    }
    figures.record("secret_rotation", restarts=cluster.restarts, answers=stages)

    assert stages["old,new"]["old URL"] == [200, 200]
    assert stages["new,old"] == {"old URL": [200, 200], "new URL": [200, 200]}
    assert stages["new"] == {"old URL": [404, 404], "new URL": [200, 200]}
    # The provider was handed the new-secret URL for the task submitted after step 2.
    provider = await cluster.sim.task(new_upstream)
    assert provider["request"]["callback_url"].endswith(f"/{new_id}/{sign(new_id, NEW)}")
    rows = await cluster.query(
        "SELECT id, progress FROM tasks WHERE id IN (:a, :b) ORDER BY id", a=old_id, b=new_id
    )
    assert dict(rows) == {old_id: 41, new_id: 61}


# -- SSRF through the real worker -----------------------------------------------------


class Canary:
    """A loopback listener that counts connections: nothing may ever reach it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free loopback port (IPv4 and IPv6); the port."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listener."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def ssrf_table(port: int) -> list[tuple[str, str]]:
    """The images issue's table of hostile links (``tests/test_fetch.py``), plus the same
    tricks aimed at the canary's port and a name that resolves to loopback.

    The empty link is left out: a snapshot without a link carries no image at all.
    """
    aimed = [
        (f"http://127.0.0.1:{port}/a.png", "bad_url"),
        (f"https://2130706433:{port}/", "bad_url"),
        (f"https://0x7f.1:{port}/", "bad_url"),
        (f"https://0x7f000001:{port}/", "bad_url"),
        (f"https://127.1:{port}/", "bad_url"),
        (f"https://0177.0.0.1:{port}/", "bad_url"),
        (f"https://127.0.0.1:{port}/a.png", "blocked_address"),
        (f"https://[::1]:{port}/a.png", "blocked_address"),
        (f"https://[::ffff:127.0.0.1]:{port}/a.png", "blocked_address"),
        (f"https://localhost:{port}/a.png", "blocked_address"),
        ("https://192.168.1.1/a.png", "blocked_address"),
        ("https://172.16.0.1/a.png", "blocked_address"),
    ]
    return [(url, code) for url, code in HOSTILE_URLS if url] + aimed


def completed_with(upstream: str, url: str) -> dict[str, Any]:
    """A completed snapshot whose image link is ``url``."""
    expires = int(time.time()) + 86_400
    return {
        "code": 200,
        "data": {
            "id": upstream,
            "status": "completed",
            "progress": 100,
            "result": {"images": [{"url": url, "expires_at": expires}]},
        },
    }


async def test_ssrf_table_is_refused_by_the_real_worker(
    clusters: ClusterPool, figures: Figures
) -> None:
    """Hostile image links applied by a callback: each refused with its code, none fetched."""
    # Unconfirmed callbacks are applied as sent, so a link can be aimed anywhere; private
    # networks are refused as in production (the simulator itself is unreachable then).
    cluster = await clusters.start(
        "postgres",
        replicas=1,
        CONFIRM_CALLBACKS=False,
        DOWNLOAD_ALLOW_PRIVATE_NETWORKS=False,
        RECONCILE_AFTER_SECONDS=600,
    )
    canary = Canary()
    port = await canary.start()
    try:
        table = ssrf_table(port)
        tasks = [await cluster.submit(f"ssrf {n} [sim:drop,eta=50000]") for n in range(len(table))]
        for task, (url, _) in zip(tasks, table, strict=True):
            upstream = task["upstream_task_id"]
            answer = await cluster.sim.callback(upstream, payload=completed_with(upstream, url))
            assert [a["status_code"] for a in answer["attempts"]] == [200], url
        done = [await cluster.wait_image(task["id"], timeout=60) for task in tasks]
        await asyncio.sleep(2)  # a retry, if one were scheduled, would start by now
    finally:
        await canary.stop()
    outcomes = {url: d["image"]["error"]["code"] for (url, _), d in zip(table, done, strict=True)}
    figures.record("ssrf", links=len(table), canary_connections=canary.connections)
    for (url, code), task in zip(table, done, strict=True):
        assert task["image"]["status"] == "failed", url
        assert outcomes[url] == code, url
    assert canary.connections == 0
    rows = await cluster.query("SELECT attempts FROM images")
    assert {row[0] for row in rows} == {1}, "a refused link is never tried again"
    stats = await cluster.sim.stats()
    assert stats["image_gets"] == 0
