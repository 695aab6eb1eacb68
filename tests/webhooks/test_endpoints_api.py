"""/webhook-endpoints, per-task webhook_url, delivery records, redelivery and recovery,
through the real app on both databases, delivering to a real receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from app.models import utcnow
from app.webhooks import outbox
from app.webhooks import repository as webhook_repository
from app.webhooks.delivery import Deliverer, Sender
from tests.api.test_webhooks import Stack, build_stack, hook
from tests.conftest import make_settings
from tests.helpers import dumps, task_body
from tests.ports import free_port
from tests.webhooks.receiver import create_receiver

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECOND = {"Authorization": "Bearer second-token-bbbbbbbbbbbbbbbbbb"}


@pytest_asyncio.fixture(loop_scope="session")
async def receiver() -> AsyncIterator[httpx.AsyncClient]:
    """The receiver served on a loopback port; a client on its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_receiver(), port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, 10)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(service_factory: Any, database_url: str, tmp_path: Path) -> Stack:
    """Callbacks applied as they come; loopback allowed for webhooks; retries at once."""
    settings = make_settings(
        database_url,
        tmp_path,
        confirm_callbacks=False,
        webhook_allowed_networks="127.0.0.0/8",
        webhook_retry_schedule="0,0,0",
        webhook_timeout_seconds=10,  # a slow first answer on a busy machine is no failure
    )
    return await build_stack(service_factory, settings)


async def create(stack: Stack, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return await stack.service.client.post("/webhook-endpoints", json=body, headers=headers)


async def callback(stack: Stack, task: dict[str, Any], status: str, **body: Any) -> None:
    raw = dumps(task_body(status, upstream_id=task["upstream_task_id"], **body))
    response = await stack.service.client.post(hook(task["id"]), content=raw)
    assert response.status_code == 200, response.text


async def deliver_due(stack: Stack, rounds: int = 20) -> int:
    """Run the delivery worker's rounds in-process until nothing is due; how many were sent."""
    runtime = stack.service.runtime
    deliverer = Deliverer(
        runtime.engine,
        runtime.settings,
        Sender(runtime.webhooks.policy, runtime.settings.webhook_timeout_seconds),
    )
    sent = 0
    try:
        for _ in range(rounds):
            async with runtime.engine.begin() as db:
                jobs = await outbox.claim_due(
                    db, now=utcnow(), owner="test", lease=deliverer.lease, limit=10
                )
            if not jobs:
                break
            await asyncio.gather(*(deliverer.run(job) for job in jobs))
            sent += len(jobs)
    finally:
        await deliverer.sender.aclose()
    return sent


async def received(receiver: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await receiver.get("/_received")).json()
    return [row for row in rows if row["path"] == path]


async def script(receiver: httpx.AsyncClient, path: str, *answers: dict[str, Any]) -> None:
    await receiver.post("/_script", json={"path": path, "answers": list(answers)})


async def test_endpoints_are_created_read_changed_and_deleted(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Create answers the secret once; default types are the settled ones; PATCH and DELETE work."""
    url = f"{receiver.base_url}/crud"
    made = await create(stack, url=url, description="orders")
    assert made.status_code == 201, made.text
    endpoint = made.json()
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["event_types"] == [
        "task.failed",
        "task.cancelled",
        "image.stored",
        "image.failed",
    ]
    assert endpoint["enabled"] is True
    path = f"/webhook-endpoints/{endpoint['id']}"
    shown = (await stack.service.client.get(path)).json()
    assert "secret" not in shown
    assert shown["description"] == "orders"
    secret = (await stack.service.client.get(f"{path}/secret")).json()["secret"]
    assert secret == endpoint["secret"]
    listed = (await stack.service.client.get("/webhook-endpoints")).json()["items"]
    assert endpoint["id"] in [item["id"] for item in listed]
    patched = await stack.service.client.patch(
        path, json={"event_types": ["image.stored"], "enabled": False}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["event_types"] == ["image.stored"]
    assert patched.json()["disabled_reason"] == "caller"
    assert (await stack.service.client.delete(path)).status_code == 204
    assert (await stack.service.client.get(path)).status_code == 404


async def test_another_token_sees_none_of_them(stack: Stack, receiver: httpx.AsyncClient) -> None:
    """Endpoints are scoped to the token: the second one gets 404s and an empty list."""
    endpoint = (await create(stack, url=f"{receiver.base_url}/scope")).json()
    path = f"/webhook-endpoints/{endpoint['id']}"
    client = stack.service.client
    assert (await client.get(path, headers=SECOND)).status_code == 404
    assert (await client.get(f"{path}/secret", headers=SECOND)).status_code == 404
    assert (await client.patch(path, json={"enabled": False}, headers=SECOND)).status_code == 404
    assert (await client.delete(path, headers=SECOND)).status_code == 404
    assert (await client.get("/webhook-endpoints", headers=SECOND)).json()["items"] == []
    assert (await client.get(path)).json()["enabled"] is True
    mine = (await client.get("/webhook-endpoints/default/secret")).json()["secret"]
    theirs = (await client.get("/webhook-endpoints/default/secret", headers=SECOND)).json()
    assert mine.startswith("whsec_")
    assert theirs["secret"].startswith("whsec_")
    assert mine != theirs["secret"]


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"url": "http://93.184.216.34/hook"}, "url", "https"),
        ({"url": "https://169.254.169.254/latest"}, "url", "WEBHOOK_ALLOWED_NETWORKS"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url", "credentials"),
        ({"url": "http://127.0.0.1/x", "event_types": ["image.done"]}, "event_types", "unknown"),
        ({"url": "http://127.0.0.1/x", "event_types": []}, "event_types", "at least one"),
    ],
)
async def test_a_bad_subscription_is_a_clear_422_and_creates_nothing(
    stack: Stack, body: dict[str, Any], field: str, reason: str
) -> None:
    """Each refusal names its field and reason; no endpoint is created."""
    response = await create(stack, **body)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert details[0]["field"] == field
    assert reason in details[0]["reason"]
    assert (await stack.service.client.get("/webhook-endpoints")).json()["items"] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"webhook_url": "http://93.184.216.34/hook"}, "webhook_url"),
        ({"webhook_url": "http://127.0.0.1/x", "webhook_events": ["nope"]}, "webhook_events"),
        ({"webhook_events": ["image.stored"]}, "webhook_events"),
    ],
)
async def test_a_bad_task_webhook_is_refused_before_anything_is_sent(
    stack: Stack, fields: dict[str, Any], field: str
) -> None:
    """POST /tasks with a refused webhook_url or events: 422, no task, nothing upstream."""
    response = await stack.service.client.post("/tasks", json={"prompt": "a cat", **fields})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
    assert await stack.service.sql("SELECT id FROM tasks") == []


async def test_a_task_webhook_and_an_endpoint_get_signed_deliveries(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """task.failed reaches the task's URL (default secret) and an endpoint (its own secret),
    both verified by standardwebhooks and svix, and the task's story lists the deliveries."""
    endpoint = (await create(stack, url=f"{receiver.base_url}/standing")).json()
    task = await stack.submit(webhook_url=f"{receiver.base_url}/own")
    await callback(stack, task, "failed")
    assert await deliver_due(stack) == 2
    default = (await stack.service.client.get("/webhook-endpoints/default/secret")).json()
    for path, secret in (("/own", default["secret"]), ("/standing", endpoint["secret"])):
        [request] = await received(receiver, path)
        body = request["body"].encode()
        assert StandardWebhook(secret).verify(body, request["headers"])["type"] == "task.failed"
        SvixWebhook(secret).verify(body, request["headers"])
        event = json.loads(body)
        assert request["headers"]["webhook-id"] == event["id"]
        assert event["data"]["id"] == task["id"]
        assert event["data"]["settled"] is True
        assert "authorization" not in request["headers"]
        assert "cookie" not in request["headers"]
    story = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    failed = next(event for event in story if event["type"] == "task.failed")
    assert {d["endpoint_id"] for d in failed["deliveries"]} == {None, endpoint["id"]}
    for delivery in failed["deliveries"]:
        assert delivery["status"] == "delivered"
        assert [a["status_code"] for a in delivery["attempts"]] == [200]
    other = await stack.service.client.get(f"/tasks/{task['id']}/events", headers=SECOND)
    assert all(event["deliveries"] == [] for event in other.json()["items"])


async def test_a_tasks_events_wait_for_the_earlier_one_to_be_delivered(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Only the oldest pending delivery of a task to a target is claimable; after 500, 500,
    200 the next follows, so the receiver sees them in order."""
    await create(
        stack,
        url=f"{receiver.base_url}/ordered",
        event_types=["task.created", "task.processing", "task.failed"],
    )
    await script(receiver, "/ordered", {"status": 500}, {"status": 500})
    task = await stack.submit()
    await callback(stack, task, "processing", progress=10)
    await callback(stack, task, "failed")
    async with stack.service.runtime.engine.connect() as db:
        claimed = await outbox.claim_due(
            db, now=utcnow(), owner="probe", lease=timedelta(seconds=1), limit=10
        )
        await db.rollback()  # a look only: the claim is undone
    assert [job.event_type for job in claimed if job.task_id == task["id"]] == ["task.created"]
    await deliver_due(stack)
    got = await received(receiver, "/ordered")
    types = [json.loads(row["body"])["type"] for row in got]
    assert types == ["task.created"] * 3 + ["task.processing", "task.failed"]
    assert len({row["headers"]["webhook-id"] for row in got[:3]}) == 1


async def test_410_disables_the_endpoint_and_tells_it_as_an_event(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A 410 Gone stops the endpoint: disabled (gone), its queue failed, endpoint.disabled
    in the feed, nothing more sent."""
    endpoint = (
        await create(stack, url=f"{receiver.base_url}/gone", event_types=["task.created"])
    ).json()
    await script(receiver, "/gone", {"status": 410})
    await stack.submit()
    await deliver_due(stack)
    await stack.submit()
    await deliver_due(stack)
    assert len(await received(receiver, "/gone")) == 1
    shown = (await stack.service.client.get(f"/webhook-endpoints/{endpoint['id']}")).json()
    assert shown["enabled"] is False
    assert shown["disabled_reason"] == "gone"
    feed = (await stack.service.client.get("/events", params={"types": "endpoint.disabled"})).json()
    assert [event["data"]["id"] for event in feed["items"]] == [endpoint["id"]]


async def test_a_redirect_fails_and_is_never_followed(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """302 to another path: recorded as a failure each time, the target never reached."""
    await create(stack, url=f"{receiver.base_url}/moved", event_types=["task.created"])
    target = f"{receiver.base_url}/elsewhere"
    moved = {"status": 302, "headers": {"location": target}}
    await script(receiver, "/moved", moved, moved, moved)
    task = await stack.submit()
    await deliver_due(stack)
    assert len(await received(receiver, "/moved")) == 3
    assert await received(receiver, "/elsewhere") == []
    story = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    [delivery] = story[0]["deliveries"]
    assert delivery["status"] == "failed"
    assert all("redirect" in attempt["error"] for attempt in delivery["attempts"])


async def test_redeliver_and_recover_send_the_same_event_again(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A failed delivery is sent again by recover (same webhook-id); redeliver resends a
    delivered one; another token cannot redeliver it."""
    endpoint = (
        await create(stack, url=f"{receiver.base_url}/again", event_types=["task.created"])
    ).json()
    await script(receiver, "/again", {"status": 500}, {"status": 500}, {"status": 500})
    before = utcnow()
    task = await stack.submit()
    await deliver_due(stack)
    assert len(await received(receiver, "/again")) == 3
    recover = await stack.service.client.post(
        f"/webhook-endpoints/{endpoint['id']}/recover", params={"since": before.isoformat()}
    )
    assert recover.status_code == 200, recover.text
    assert recover.json() == {"queued": 1}
    await deliver_due(stack)
    got = await received(receiver, "/again")
    assert len(got) == 4
    assert len({row["headers"]["webhook-id"] for row in got}) == 1
    event_id = got[0]["headers"]["webhook-id"]
    refused = await stack.service.client.post(f"/events/{event_id}/redeliver", headers=SECOND)
    assert refused.status_code == 404
    again = await stack.service.client.post(f"/events/{event_id}/redeliver")
    assert again.json() == {"queued": 1}
    await deliver_due(stack)
    assert len(await received(receiver, "/again")) == 5
    story = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    assert len(story[0]["deliveries"][0]["attempts"]) == 5


async def test_a_rotated_secret_signs_alongside_the_old_one(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """After rotation a delivery carries two signatures: the old and the new secret verify."""
    made = (
        await create(stack, url=f"{receiver.base_url}/rotated", event_types=["task.created"])
    ).json()
    rotated = await stack.service.client.post(f"/webhook-endpoints/{made['id']}/secret/rotate")
    assert rotated.status_code == 200, rotated.text
    fresh = rotated.json()["secret"]
    assert fresh != made["secret"]
    shown = (await stack.service.client.get(f"/webhook-endpoints/{made['id']}/secret")).json()
    assert shown["secret"] == fresh
    await stack.submit()
    await deliver_due(stack)
    [request] = await received(receiver, "/rotated")
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (made["secret"], fresh):
        StandardWebhook(secret).verify(request["body"].encode(), request["headers"])
        SvixWebhook(secret).verify(request["body"].encode(), request["headers"])


async def test_deliveries_and_attempts_go_with_retention(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Pruning before a future instant deletes every delivery and its attempts, in batches."""
    await create(stack, url=f"{receiver.base_url}/pruned", event_types=["task.created"])
    for _ in range(3):
        await stack.submit()
    await deliver_due(stack)
    engine = stack.service.runtime.engine
    future = utcnow() + timedelta(days=1)
    async with engine.begin() as db:
        first = await outbox.prune_deliveries(db, before=future, limit=2)
    async with engine.begin() as db:
        rest = await outbox.prune_deliveries(db, before=future, limit=10)
    assert (first, rest) == (2, 1)
    assert await stack.service.sql("SELECT id FROM webhook_deliveries") == []
    assert await stack.service.sql("SELECT id FROM webhook_attempts") == []


async def test_a_redelivery_under_way_outlives_a_prune_of_its_delivery(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A redelivery that has put a settled delivery back in the queue, not yet committed
    when retention picks that delivery to delete, keeps it: the prune leaves what it
    cannot lock (PostgreSQL) or waits for the write lock (SQLite), and takes only what
    is still settled once it looks."""
    await create(stack, url=f"{receiver.base_url}/again", event_types=["task.created"])
    await stack.submit()
    await deliver_due(stack)
    [[delivery_id, event_id, task_id, owner]] = await stack.service.sql(
        "SELECT id, event_id, task_id, owner FROM webhook_deliveries"
    )
    engine = stack.service.runtime.engine
    future = utcnow() + timedelta(days=1)
    async with engine.connect() as redelivering:
        transaction = await redelivering.begin()
        queued = await webhook_repository.redeliver(
            redelivering,
            event_id=event_id,
            kind="task.created",
            task_id=task_id,
            owner=owner,
            now=utcnow(),
        )
        assert queued == 1

        async def prune() -> int:
            async with engine.begin() as db:
                return await outbox.prune_deliveries(db, before=future, limit=10)

        pruning = asyncio.create_task(prune())
        if engine.dialect.name == "postgresql":
            # It skips the row it cannot lock and ends with the redelivery still open
            # (one that waited for the lock would run into the timeout, then delete).
            await asyncio.wait({pruning}, timeout=10)
        else:
            await asyncio.sleep(0.5)  # the prune waits for the write lock meanwhile
        await transaction.commit()
    assert await pruning == 0
    assert await stack.service.sql("SELECT id, status FROM webhook_deliveries") == [
        (delivery_id, "pending")
    ]
    assert len(await stack.service.sql("SELECT id FROM webhook_attempts")) == 1


async def test_an_endpoint_failing_too_long_is_disabled(
    service_factory: Any, database_url: str, tmp_path: Path, receiver: httpx.AsyncClient
) -> None:
    """With WEBHOOK_DISABLE_AFTER_SECONDS scaled down, an endpoint whose deliveries keep
    failing past it is disabled (reason failing) and endpoint.disabled is written."""
    settings = make_settings(
        database_url,
        tmp_path,
        webhook_allowed_networks="127.0.0.0/8",
        webhook_retry_schedule="0,0.3,0.3",
        webhook_disable_after_seconds=0.2,
    )
    failing = await build_stack(service_factory, settings)
    endpoint = (
        await create(failing, url=f"{receiver.base_url}/down", event_types=["task.created"])
    ).json()
    await script(receiver, "/down", *[{"status": 500}] * 3)
    await failing.submit()
    await deliver_due(failing)
    await asyncio.sleep(0.35)  # the schedule's wait: the next attempt is due
    await deliver_due(failing)
    shown = (await failing.service.client.get(f"/webhook-endpoints/{endpoint['id']}")).json()
    assert shown["enabled"] is False
    assert shown["disabled_reason"] == "failing"
    assert shown["failing_since"] is not None
    feed = await failing.service.client.get("/events", params={"types": "endpoint.disabled"})
    assert [e["data"]["disabled_reason"] for e in feed.json()["items"]] == ["failing"]
    assert len(await received(receiver, "/down")) == 2


async def test_concurrent_outcomes_for_one_endpoint_are_all_recorded(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Twelve deliveries to one endpoint answered at once (500s and a 410) are each recorded:
    the endpoint ends disabled and none is left leased and pending."""
    endpoint = (
        await create(stack, url=f"{receiver.base_url}/burst", event_types=["task.created"])
    ).json()
    # Every answer comes back at about the same moment, so their records race.
    fail, gone = {"status": 500, "sleep": 0.3}, {"status": 410, "sleep": 0.3}
    await script(receiver, "/burst", *[fail] * 5, gone, *[fail] * 6)
    for _ in range(12):
        await stack.submit()
    runtime = stack.service.runtime
    deliverer = Deliverer(
        runtime.engine,
        runtime.settings,
        Sender(runtime.webhooks.policy, runtime.settings.webhook_timeout_seconds),
    )
    async with runtime.engine.begin() as db:
        # All twelve at once (past the per-endpoint cap), so that their records race.
        jobs = await outbox.claim_due(
            db, now=utcnow(), owner="burst", lease=deliverer.lease, limit=20, per_target=12
        )
    assert len(jobs) == 12
    await asyncio.gather(*(deliverer.run(job) for job in jobs))
    await deliverer.sender.aclose()
    left = await stack.service.sql(
        "SELECT id FROM webhook_deliveries WHERE lease_owner IS NOT NULL AND status = 'pending'"
    )
    assert left == []
    shown = (await stack.service.client.get(f"/webhook-endpoints/{endpoint['id']}")).json()
    assert shown["disabled_reason"] == "gone"


async def test_a_task_url_answering_410_gets_nothing_more(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """410 from a task's own webhook_url stops that task's deliveries; other tasks' go on."""
    url = f"{receiver.base_url}/own-gone"
    await script(receiver, "/own-gone", {"status": 410})
    events = ["task.created", "task.processing", "task.failed"]
    task = await stack.submit(webhook_url=url, webhook_events=events)
    await callback(stack, task, "processing", progress=10)
    await callback(stack, task, "failed")
    await deliver_due(stack)
    assert len(await received(receiver, "/own-gone")) == 1
    story = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    statuses = [d["status"] for event in story for d in event["deliveries"]]
    assert statuses == ["failed", "failed", "failed"]
    other = await stack.submit(webhook_url=url, webhook_events=["task.created"])
    await deliver_due(stack)
    got = await received(receiver, "/own-gone")
    assert json.loads(got[-1]["body"])["data"]["id"] == other["id"]
