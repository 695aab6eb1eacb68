"""Signed webhooks end to end: the service process delivers to a receiver process over
HTTP; standardwebhooks and svix verify every signature; retries, Retry-After, redirects,
410 and order per task as a receiver sees them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from tests.e2e.pool import StackPool
from tests.e2e.stack import Stack, wait_for
from tests.ports import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
RETRY_AFTER = 2  # seconds a 503 asks for; the schedule's own waits are much shorter


@pytest.fixture(scope="module")
def receiver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The receiver as its own process on a loopback port."""
    port = free_port()
    log = (tmp_path_factory.mktemp("receiver") / "receiver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.webhooks.receiver", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/_received", timeout=1)
            break
        except httpx.TransportError:
            subprocess.run(["sleep", "0.05"], check=True)
    yield url
    process.terminate()
    process.wait(10)
    log.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def receiver(receiver_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the receiver's script and record."""
    async with httpx.AsyncClient(base_url=receiver_url, timeout=10, trust_env=False) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(module_stacks: StackPool) -> Stack:
    """The service with loopback allowed and a short retry schedule."""
    return await module_stacks.start(
        WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        WEBHOOK_RETRY_SCHEDULE="0,0.5,0.5,0.5",
        WEBHOOK_TIMEOUT_SECONDS=3,
    )


async def received(receiver: httpx.AsyncClient, path: str, count: int) -> list[dict[str, Any]]:
    """The receiver's requests on `path`, once there are at least `count`."""

    async def probe() -> list[dict[str, Any]] | None:
        rows = [r for r in (await receiver.get("/_received")).json() if r["path"] == path]
        return rows if len(rows) >= count else None

    return await wait_for(probe, timeout=60, what=f"{count} requests on {path}")


async def endpoint(stack: Stack, url: str, types: list[str]) -> dict[str, Any]:
    response = await stack.client.post(
        "/webhook-endpoints", json={"url": url, "event_types": types}
    )
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def verify_both(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """Both reference verifiers accept the request as the receiver saw it; the event."""
    body = request["body"].encode()
    event: dict[str, Any] = StandardWebhook(secret).verify(body, request["headers"])
    SvixWebhook(secret).verify(body, request["headers"])
    return event


async def test_image_stored_reaches_the_task_url_and_an_endpoint_signed(
    stack: Stack, receiver: httpx.AsyncClient, db_kind: str
) -> None:
    """A real task: image.stored is POSTed to its webhook_url and to a standing endpoint;
    each verifies with standardwebhooks and svix under its own secret."""
    standing = await endpoint(stack, f"{receiver.base_url}/{db_kind}/standing", ["image.stored"])
    task = await stack.submit("a lighthouse", webhook_url=f"{receiver.base_url}/{db_kind}/own")
    [own] = await received(receiver, f"/{db_kind}/own", 1)
    [other] = await received(receiver, f"/{db_kind}/standing", 1)
    default = (await stack.client.get("/webhook-endpoints/default/secret")).json()["secret"]
    for request, secret in ((own, default), (other, standing["secret"])):
        event = verify_both(secret, request)
        assert event["type"] == "image.stored"
        assert event["data"]["id"] == task["id"]
        assert event["data"]["settled"] is True
        assert request["headers"]["webhook-id"] == event["id"]
        assert event["data"]["image"]["url"] == f"{stack.service_url}/tasks/{task['id']}/image"
    assert own["headers"]["webhook-id"] == other["headers"]["webhook-id"]
    # What the receiver saw, for the record: the one signed delivery, headers and body.
    print(json.dumps({"headers": own["headers"], "body": json.loads(own["body"])}, indent=2))

    async def recorded() -> list[dict[str, Any]] | None:
        # The receiver answers before the service records its answer: wait for the record.
        story = (await stack.client.get(f"/tasks/{task['id']}/events")).json()["items"]
        stored = next(e for e in story if e["type"] == "image.stored")
        deliveries: list[dict[str, Any]] = stored["deliveries"]
        return deliveries if all(d["status"] != "pending" for d in deliveries) else None

    deliveries = await wait_for(recorded, timeout=30, what="the deliveries to be recorded")
    assert sorted(d["status"] for d in deliveries) == ["delivered", "delivered"]
    assert all([a["status_code"] for a in d["attempts"]] == [200] for d in deliveries)


async def test_500s_are_retried_in_order_and_retry_after_is_honoured(
    stack: Stack, receiver: httpx.AsyncClient, db_kind: str
) -> None:
    """500, then 503 with Retry-After, then 200: three tries of one webhook-id, the third
    no sooner than Retry-After; the task's later events follow only after it, in order."""
    path = f"/{db_kind}/flaky"
    retry_after = {"status": 503, "headers": {"retry-after": str(RETRY_AFTER)}}
    await receiver.post("/_script", json={"path": path, "answers": [{"status": 500}, retry_after]})
    types = ["task.created", "task.completed", "image.stored"]
    hook = await endpoint(stack, f"{receiver.base_url}{path}", types)
    task = await stack.submit("a flaky receiver")
    got = await received(receiver, path, 5)
    events = [verify_both(hook["secret"], request) for request in got]
    assert [e["type"] for e in events] == ["task.created"] * 3 + types[1:]
    assert {e["data"]["id"] for e in events} == {task["id"]}
    assert len({request["headers"]["webhook-id"] for request in got[:3]}) == 1
    assert got[2]["at"] - got[1]["at"] >= RETRY_AFTER - 0.05


async def test_a_redirect_is_a_failure_and_410_disables(
    stack: Stack, receiver: httpx.AsyncClient, db_kind: str
) -> None:
    """A 307 is never followed and counts as a failure; a 410 disables its endpoint."""
    moved, gone = f"/{db_kind}/moved", f"/{db_kind}/gone"
    redirect = {"status": 307, "headers": {"location": f"{receiver.base_url}/{db_kind}/target"}}
    await receiver.post("/_script", json={"path": moved, "answers": [redirect] * 4})
    await receiver.post("/_script", json={"path": gone, "answers": [{"status": 410}]})
    redirected = await endpoint(stack, f"{receiver.base_url}{moved}", ["task.created"])
    dead = await endpoint(stack, f"{receiver.base_url}{gone}", ["task.created"])
    task = await stack.submit("nobody home")
    await received(receiver, moved, 4)
    await received(receiver, gone, 1)

    async def settled() -> list[dict[str, Any]] | None:
        story = (await stack.client.get(f"/tasks/{task['id']}/events")).json()["items"]
        ours = (redirected["id"], dead["id"])
        deliveries = [d for d in story[0]["deliveries"] if d["endpoint_id"] in ours]
        done = len(deliveries) == 2 and all(d["status"] == "failed" for d in deliveries)
        return deliveries if done else None

    deliveries = await wait_for(settled, timeout=30, what="both deliveries to fail")
    assert all(a["error"] for d in deliveries for a in d["attempts"])
    rows = [r for r in (await receiver.get("/_received")).json() if r["path"].endswith("/target")]
    assert rows == []
    shown = (await stack.client.get(f"/webhook-endpoints/{dead['id']}")).json()
    assert shown["enabled"] is False
    assert shown["disabled_reason"] == "gone"
    await stack.submit("after the 410")
    feed = (await stack.client.get("/events", params={"types": "endpoint.disabled"})).json()
    assert dead["id"] in [event["data"]["id"] for event in feed["items"]]
    assert len([r for r in (await receiver.get("/_received")).json() if r["path"] == gone]) == 1


@pytest.mark.postgres
async def test_two_replicas_send_each_event_once_in_order(
    postgres_stacks: StackPool, receiver: httpx.AsyncClient
) -> None:
    """Two service processes claim from one outbox (SKIP LOCKED): every event of 20 tasks
    arrives exactly once, each task's in order."""
    settings = {"WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "WEBHOOK_RETRY_SCHEDULE": "0,0.5"}
    stack = await postgres_stacks.start(**settings)
    await stack.start_extra_service(**settings)
    path = "/replicas"
    types = ["task.created", "task.completed", "image.stored"]
    hook = await endpoint(stack, f"{receiver.base_url}{path}", types)
    tasks = [await stack.submit(f"replica {n}") for n in range(20)]
    await received(receiver, path, 60)

    async def outbox_empty() -> bool:
        rows = await stack.sql("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
        return rows[0][0] == 0

    await wait_for(outbox_empty, timeout=30, what="the outbox to drain")
    got = await received(receiver, path, 60)  # read again: a duplicate would show now
    events = [verify_both(hook["secret"], request) for request in got]
    ids = [event["id"] for event in events]
    assert len(ids) == len(set(ids)) == 60
    for task in tasks:
        mine = [event["type"] for event in events if event["data"]["id"] == task["id"]]
        assert mine == types
