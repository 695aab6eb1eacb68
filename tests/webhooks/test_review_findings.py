"""Regressions from the adversarial review of outbound webhooks: each failed before its fix."""
# ruff: noqa: F811  (pytest fixtures are imported and then taken as arguments)

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.config import SettingsError
from app.console.auth import Session
from app.console.routes import stream_scope
from app.events import repository as event_repository
from app.events.bus import Notice
from app.events.feed import SHARED_TYPES, matches
from app.events.repository import EventScope
from app.logging import configure_logging
from app.models import utcnow
from app.webhooks import outbox, repository
from app.webhooks.delivery import MAX_BODY_BYTES, Sender, webhook_body
from app.webhooks.endpoints import MAX_PREVIOUS_SECRETS
from app.webhooks.policy import WebhookPolicy
from tests.api.test_events_api import SseReader, live  # noqa: F401  (fixture)
from tests.api.test_webhooks import Stack, build_stack
from tests.conftest import make_settings
from tests.webhooks.test_endpoints_api import (  # noqa: F401  (fixtures)
    SECOND,
    callback,
    create,
    deliver_due,
    received,
    receiver,
    script,
    stack,
)

session_loop = pytest.mark.asyncio(loop_scope="session")


async def claim(stack: Stack, owner: str, limit: int = 10) -> list[outbox.DeliveryJob]:
    """One claim round, committed, with a long lease (the attempt is 'in flight')."""
    async with stack.service.runtime.engine.begin() as db:
        return await outbox.claim_due(
            db, now=utcnow(), owner=owner, lease=timedelta(minutes=5), limit=limit
        )


# -- 1. one event is never sent twice at once -----------------------------------------


@session_loop
async def test_a_delivery_in_flight_is_never_claimed_twice(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Disable, re-enable and recover while a delivery is leased: it is not claimable again
    until the first attempt ends (never two deliveries of one event at once)."""
    endpoint = (
        await create(stack, url=f"{receiver.base_url}/twice", event_types=["task.created"])
    ).json()
    task = await stack.submit()
    [job] = [j for j in await claim(stack, "one") if j.task_id == task["id"]]
    # ...the first replica is now POSTing job (its lease runs 5 more minutes)...
    path = f"/webhook-endpoints/{endpoint['id']}"
    client = stack.service.client
    since = (utcnow() - timedelta(hours=1)).isoformat()
    assert (await client.patch(path, json={"enabled": False})).status_code == 200
    assert (await client.patch(path, json={"enabled": True})).status_code == 200
    assert (await client.post(f"{path}/recover", params={"since": since})).status_code == 200
    assert job.id not in [j.id for j in await claim(stack, "two")]


@session_loop
async def test_a_delivery_in_flight_when_its_endpoint_is_deleted_keeps_its_fencing(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Deleting the endpoint leaves the leased delivery to its attempt (the lease stays), and
    the attempt's retry then fails it for the gone endpoint instead of sending it."""
    endpoint = (
        await create(stack, url=f"{receiver.base_url}/deleted", event_types=["task.created"])
    ).json()
    task = await stack.submit()
    [job] = [j for j in await claim(stack, "one") if j.task_id == task["id"]]
    path = f"/webhook-endpoints/{endpoint['id']}"
    assert (await stack.service.client.delete(path)).status_code == 204
    async with stack.service.runtime.engine.connect() as db:
        row = (
            await db.execute(
                select(repository.DELIVERIES).where(repository.DELIVERIES.c.id == job.id)
            )
        ).one()
    assert (row.status, row.lease_owner) == ("pending", job.lease_owner)
    # The attempt ends (a failure to retry at once); the retry finds no endpoint.
    async with stack.service.runtime.engine.begin() as db:
        assert await outbox.finish(db, job, {"status": "pending", "next_attempt_at": utcnow()})
    await deliver_due(stack)
    async with stack.service.runtime.engine.connect() as db:
        row = (
            await db.execute(
                select(repository.DELIVERIES).where(repository.DELIVERIES.c.id == job.id)
            )
        ).one()
    assert row.status == "failed"
    assert await received(receiver, "/deleted") == []


# -- 2. signing secrets never reach the log -------------------------------------------


@session_loop
async def test_a_failed_statement_never_carries_its_parameters(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A database error (here a duplicate id) does not print the statement's values, so an
    endpoint's new secret cannot reach the traceback that is logged."""
    made = (await create(stack, url=f"{receiver.base_url}/dup")).json()
    now = utcnow()
    secret = "whsec_" + "Q" * 32
    values = {
        "id": made["id"],
        "owner": "someone",
        "url": "http://127.0.0.1/x",
        "event_types": ",task.created,",
        "enabled": True,
        "secret": secret,
        "created_at": now,
        "updated_at": now,
    }
    with pytest.raises(IntegrityError) as caught:
        async with stack.service.runtime.engine.begin() as db:
            await repository.insert_endpoint(db, values)
    assert secret not in str(caught.value)
    assert "hidden" in str(caught.value)  # SQLAlchemy says the parameters were hidden


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_signing_secret_in_a_traceback_is_redacted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], log_format: str
) -> None:
    """Any whsec_ value (not only configured ones) is hidden in every log format."""
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path}/x.db", tmp_path, log_format=log_format
    )
    configure_logging(settings)
    secret = "whsec_Y2j74kBY/HQ8jlEuhV1MeupDgxWwJiWw"
    try:
        raise RuntimeError(f"[parameters: ('we_1', '{secret}')]")
    except RuntimeError:
        structlog.get_logger("test").exception("unhandled_error", note=f"secret={secret}")
    err = capfd.readouterr().err
    assert "unhandled_error" in err
    assert "whsec_" not in err


# -- 3. endpoint events are their owner's alone ---------------------------------------


@session_loop
async def test_another_token_never_sees_my_endpoint_through_the_feed(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """endpoint.disabled (data: the endpoint, URL included) shows in its owner's feed only,
    even with scope=all."""
    secret_path = "/hooks/T0001/B0002/s3cr3t-in-the-path"
    await script(receiver, secret_path, {"status": 410})
    await create(stack, url=f"{receiver.base_url}{secret_path}", event_types=["task.created"])
    await stack.submit()
    await deliver_due(stack)
    mine = (await stack.service.client.get("/events", params={"scope": "all"})).json()
    assert any(e["type"] == "endpoint.disabled" for e in mine["items"])  # it happened
    theirs = await stack.service.client.get("/events", params={"scope": "all"}, headers=SECOND)
    assert theirs.status_code == 200, theirs.text
    assert "s3cr3t-in-the-path" not in theirs.text
    assert any(e["type"] == "task.created" for e in theirs.json()["items"])  # tasks still shared


@session_loop
async def test_another_tokens_stream_skips_my_endpoint_events(
    stack: Stack, receiver: httpx.AsyncClient, live: httpx.AsyncClient
) -> None:
    """GET /events/stream?scope=all for another token: the task events, not endpoint.disabled."""
    await script(receiver, "/gone-stream", {"status": 410})
    await create(stack, url=f"{receiver.base_url}/gone-stream", event_types=["task.created"])
    mine = await stack.submit()
    await deliver_due(stack)  # 410: endpoint.disabled is recorded after task.created
    theirs = await stack.service.client.post("/tasks", json={"prompt": "a dog"}, headers=SECOND)
    assert theirs.status_code == 202, theirs.text
    params = {"scope": "all"}
    async with live.stream("GET", "/events/stream", params=params, headers=SECOND) as response:
        reader = SseReader(response)
        seen = [json.loads((await reader.next_event())["data"]) for _ in range(2)]
    assert [(e["type"], e["data"]["id"]) for e in seen] == [
        ("task.created", mine["id"]),
        ("task.created", theirs.json()["id"]),
    ]


def test_the_console_stream_shows_an_endpoint_event_to_its_owner_only() -> None:
    """The console's live stream takes the signed-in token as the viewer."""
    scope = stream_scope(Session("b", 0), None)
    assert not matches(scope, Notice("endpoint.disabled", "we_1", "a"))
    assert matches(scope, Notice("endpoint.disabled", "we_1", "b"))
    assert matches(scope, Notice("task.created", "tsk_1", "a"))


def test_the_stream_is_not_woken_for_another_tokens_endpoint_event() -> None:
    """The live stream's filter lets an endpoint event through to its owner only."""
    scope = EventScope(viewer="b", shared=SHARED_TYPES)
    assert not matches(scope, Notice("endpoint.disabled", "we_1", "a"))
    assert matches(scope, Notice("endpoint.disabled", "we_1", "b"))
    assert matches(scope, Notice("task.created", "tsk_1", "a"))


# -- 4. retention never breaks the outbox ---------------------------------------------


@session_loop
async def test_an_event_pruned_under_a_pending_delivery_does_not_stop_every_claim(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A pending delivery whose event is gone is dropped with its reason; the others'
    deliveries are still claimed."""
    await create(stack, url=f"{receiver.base_url}/orphan", event_types=["task.created"])
    orphan = await stack.submit()
    other = await stack.submit()
    async with stack.service.runtime.engine.begin() as db:
        await db.execute(text("DELETE FROM events WHERE task_id = :id"), {"id": orphan["id"]})
    jobs = await claim(stack, "probe")
    assert other["id"] in [job.task_id for job in jobs]
    assert orphan["id"] not in [job.task_id for job in jobs]
    async with stack.service.runtime.engine.connect() as db:
        rows = (
            await db.execute(
                select(repository.DELIVERIES).where(repository.DELIVERIES.c.task_id == orphan["id"])
            )
        ).all()
    assert [(row.status, row.lease_owner) for row in rows] == [("failed", None)]
    assert "no longer exists" in rows[0].last_error


@session_loop
async def test_retention_keeps_an_event_while_a_delivery_of_it_is_pending(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Pruning takes settled deliveries first and an event only once none refers to it;
    a pending delivery (still in its schedule) and its event stay."""
    await create(stack, url=f"{receiver.base_url}/prune", event_types=["task.created"])
    await script(receiver, "/prune", {"status": 200})
    settled = await stack.submit()
    await deliver_due(stack)
    waiting = await stack.submit()  # its delivery stays pending
    later = utcnow() + timedelta(days=1)
    async with stack.service.runtime.engine.begin() as db:
        assert await outbox.prune_deliveries(db, before=later, limit=100) >= 1
        await event_repository.prune_events(db, before=later, limit=100)
    async with stack.service.runtime.engine.connect() as db:
        events = {
            row.task_id
            for row in (await db.execute(select(event_repository.EVENTS.c.task_id))).all()
        }
        pending = (
            await db.execute(
                select(repository.DELIVERIES).where(
                    repository.DELIVERIES.c.task_id == waiting["id"]
                )
            )
        ).all()
    assert settled["id"] not in events
    assert waiting["id"] in events
    assert [row.status for row in pending] == ["pending"]


def test_a_retention_shorter_than_the_retry_schedule_is_refused(tmp_path: Path) -> None:
    """EVENT_RETENTION_DAYS must outlast WEBHOOK_RETRY_SCHEDULE: one clear line otherwise."""
    with pytest.raises(SettingsError) as caught:
        make_settings(
            f"sqlite+aiosqlite:///{tmp_path}/x.db",
            tmp_path,
            event_retention_days=1,
            webhook_retry_schedule="0,86400,3600",
        )
    [line] = caught.value.problems
    assert line.startswith("WEBHOOK_RETRY_SCHEDULE:")
    assert "EVENT_RETENTION_DAYS" in line


# -- 5. a task URL that answered 410 is done ------------------------------------------


@session_loop
async def test_a_task_url_that_answered_410_gets_no_later_event(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """After the task's webhook_url answers 410, an event recorded later is not sent there."""
    url = f"{receiver.base_url}/gone-later"
    await script(receiver, "/gone-later", {"status": 410})
    task = await stack.submit(webhook_url=url, webhook_events=["task.created", "task.failed"])
    await deliver_due(stack)  # task.created -> 410
    assert len(await received(receiver, "/gone-later")) == 1
    await callback(stack, task, "failed")  # a new event, after the 410
    await deliver_due(stack)
    assert len(await received(receiver, "/gone-later")) == 1
    # Redelivering the first event does not reach the gone URL either.
    events = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    created = next(e for e in events if e["type"] == "task.created")
    assert (await stack.service.client.post(f"/events/{created['id']}/redeliver")).status_code < 300
    await deliver_due(stack)
    assert len(await received(receiver, "/gone-later")) == 1


# -- 6. one slow endpoint cannot take every slot --------------------------------------


@session_loop
async def test_one_slow_endpoint_cannot_take_every_delivery_slot(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """With 8 slots, a flood of due deliveries to one endpoint still leaves a slot for
    another caller's endpoint: at most MAX_IN_FLIGHT_PER_TARGET go to one target."""
    slow = (
        await create(stack, url=f"{receiver.base_url}/slow", event_types=["task.created"])
    ).json()
    for _ in range(8):
        await stack.submit()
    await create(
        stack, headers=SECOND, url=f"{receiver.base_url}/victim", event_types=["task.created"]
    )
    response = await stack.service.client.post("/tasks", json={"prompt": "a dog"}, headers=SECOND)
    assert response.status_code == 202, response.text
    first = await claim(stack, "probe", limit=8)
    assert response.json()["id"] in [job.task_id for job in first]
    to_slow = [job for job in first if job.target == slow["id"]]
    assert len(to_slow) == outbox.MAX_IN_FLIGHT_PER_TARGET
    # Those two are still in flight: the next round gives the slow endpoint nothing more.
    second = await claim(stack, "probe2", limit=8)
    assert [job for job in second if job.target == slow["id"]] == []


# -- 7. no cookies kept ----------------------------------------------------------------


@session_loop
async def test_receivers_cannot_grow_the_senders_cookie_jar(receiver: httpx.AsyncClient) -> None:
    """Nothing of a receiver's Set-Cookie is kept by the shared clients."""
    answers = [
        {"status": 200, "headers": {"set-cookie": f"c{i}={'x' * 3000}; Path=/"}} for i in range(50)
    ]
    await script(receiver, "/jar", *answers)
    sender = Sender(WebhookPolicy.from_entries(["127.0.0.0/8"]), timeout=5)
    try:
        for _ in range(50):
            outcome = await sender.send(f"{receiver.base_url}/jar", {}, b"{}")
            assert outcome.ok, outcome
        kept = sum(len(client.cookies.jar) for client in sender._clients.values())
    finally:
        await sender.aclose()
    assert kept == 0


# -- 8. bodies stay under 20 kB -------------------------------------------------------


def _task(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "tsk_x", "status": "pending", "settled": False}
    data.update(prompt="a cat", image_urls=None, mask_url=None, metadata={})
    data.update(fields)
    return data


def test_a_webhook_body_stays_under_20_kb_whatever_the_task_holds() -> None:
    """16 reference URLs of 2 kB and a mask: the inputs go (marked), the prompt stays."""
    data = _task(
        image_urls=[f"https://img.example.com/{i}/" + "a" * 2020 for i in range(16)],
        mask_url="https://img.example.com/m/" + "b" * 2000,
    )
    body = webhook_body("evt_x", "task.created", utcnow(), data, "https://api.example.com")
    assert len(body) < MAX_BODY_BYTES
    shown = json.loads(body)["data"]
    assert shown["inputs_truncated"] is True
    assert (shown["image_urls"], shown["mask_url"]) == (None, None)
    assert shown["prompt"] == "a cat"
    assert "prompt_truncated" not in shown


def test_the_prompt_is_cut_only_after_the_inputs() -> None:
    """A long prompt with long inputs: both shortened, in order, and each marked."""
    data = _task(prompt="p" * 30_000, image_urls=["https://img.example.com/" + "a" * 2000])
    shown = json.loads(webhook_body("evt_x", "task.created", utcnow(), data, "https://x"))
    assert shown["data"]["inputs_truncated"] is True
    assert shown["data"]["prompt_truncated"] is True
    assert 0 < len(shown["data"]["prompt"]) < 20_000


def test_whatever_else_is_large_the_body_shrinks_to_the_task_id() -> None:
    """Large metadata cannot be cut piecemeal: the body keeps id, status and settled."""
    data = _task(metadata={f"k{i}": "v" * 500 for i in range(60)})
    body = webhook_body("evt_x", "task.created", utcnow(), data, "https://x")
    assert len(body) < MAX_BODY_BYTES
    assert json.loads(body)["data"] == {
        "id": "tsk_x",
        "status": "pending",
        "settled": False,
        "truncated": True,
    }


# -- 9. a listed host name reaches private addresses only -----------------------------


def test_a_listed_host_name_still_never_reaches_cloud_metadata() -> None:
    """Listing a host name does not let it resolve to link-local metadata or loopback."""
    policy = WebhookPolicy.from_entries(["hooks.corp.example"])
    assert not policy.may_connect("https", "hooks.corp.example", "169.254.169.254")
    assert not policy.may_connect("http", "hooks.corp.example", "127.0.0.1")
    assert not policy.may_connect("http", "hooks.corp.example", "::ffff:127.0.0.1")
    assert policy.may_connect("http", "hooks.corp.example", "10.2.3.4")


def test_loopback_listed_as_a_network_is_still_reachable() -> None:
    """Loopback and link-local stay reachable when listed as networks themselves."""
    policy = WebhookPolicy.from_entries(["hooks.corp.example", "127.0.0.0/8", "169.254.1.1"])
    assert policy.may_connect("http", "hooks.corp.example", "127.0.0.1")
    assert policy.may_connect("http", "anything", "169.254.1.1")
    assert not policy.may_connect("http", "hooks.corp.example", "169.254.169.254")


# -- 10. rotating keeps every secret in its grace period ------------------------------


@session_loop
async def test_rotating_twice_keeps_the_first_secret_for_its_grace_period(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """A second rotation within the grace period does not drop the original secret."""
    made = (
        await create(stack, url=f"{receiver.base_url}/rot2", event_types=["task.created"])
    ).json()
    path = f"/webhook-endpoints/{made['id']}/secret/rotate"
    assert (await stack.service.client.post(path)).status_code == 200
    second = (await stack.service.client.post(path)).json()["secret"]
    await stack.submit()
    await deliver_due(stack)
    [request] = await received(receiver, "/rot2")
    StandardWebhook(made["secret"]).verify(request["body"].encode(), request["headers"])
    StandardWebhook(second).verify(request["body"].encode(), request["headers"])


@session_loop
async def test_only_the_newest_replaced_secrets_keep_signing(
    stack: Stack, receiver: httpx.AsyncClient
) -> None:
    """Five rotations in a grace period: the current secret and the newest
    MAX_PREVIOUS_SECRETS replaced ones sign, the oldest no longer do."""
    made = (
        await create(stack, url=f"{receiver.base_url}/rot5", event_types=["task.created"])
    ).json()
    path = f"/webhook-endpoints/{made['id']}/secret/rotate"
    secrets = [made["secret"]]
    for _ in range(5):
        secrets.append((await stack.service.client.post(path)).json()["secret"])
    await stack.submit()
    await deliver_due(stack)
    [request] = await received(receiver, "/rot5")
    body, headers = request["body"].encode(), request["headers"]
    assert len(headers["webhook-signature"].split()) == 1 + MAX_PREVIOUS_SECRETS
    for secret in secrets[-1 - MAX_PREVIOUS_SECRETS :]:
        StandardWebhook(secret).verify(body, headers)
    for secret in secrets[: -1 - MAX_PREVIOUS_SECRETS]:
        with pytest.raises(WebhookVerificationError):
            StandardWebhook(secret).verify(body, headers)


# -- 11. control characters are a clear 422 -------------------------------------------


@session_loop
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("description", "ok\x00x"),
        ("description", "bell\x07"),
        ("url", "http://127.0.0.1/a\x00b"),
        ("event_types", ["task.created\x00"]),
    ],
)
async def test_a_control_character_is_a_clear_422_that_changes_nothing(
    stack: Stack, receiver: httpx.AsyncClient, field: str, value: Any
) -> None:
    """NUL (or another control character) in an endpoint field: 422 naming the field, on
    create and on update, on both databases; nothing is written."""
    before = (await stack.service.client.get("/webhook-endpoints")).json()
    body: dict[str, Any] = {"url": f"{receiver.base_url}/nul", field: value}
    response = await create(stack, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
    assert (await stack.service.client.get("/webhook-endpoints")).json() == before
    made = (await create(stack, url=f"{receiver.base_url}/nul2")).json()
    path = f"/webhook-endpoints/{made['id']}"
    patched = await stack.service.client.patch(path, json={field: value})
    assert patched.status_code == 422, patched.text
    assert (await stack.service.client.get(path)).json()["url"] == f"{receiver.base_url}/nul2"


@session_loop
async def test_a_description_may_span_lines(stack: Stack, receiver: httpx.AsyncClient) -> None:
    """Tabs and line breaks are prose, not control characters to refuse."""
    response = await create(stack, url=f"{receiver.base_url}/lines", description="a\n\tb")
    assert response.status_code == 201, response.text


# -- 12. a cap on endpoints per token -------------------------------------------------


@session_loop
async def test_a_token_has_at_most_webhook_max_endpoints(
    service_factory: Any, database_url: str, tmp_path: Path, receiver: httpx.AsyncClient
) -> None:
    """Past WEBHOOK_MAX_ENDPOINTS, creating one more is a 409 that writes nothing; other
    tokens and a freed place are not affected."""
    settings = make_settings(
        database_url, tmp_path, webhook_allowed_networks="127.0.0.0/8", webhook_max_endpoints=2
    )
    capped = await build_stack(service_factory, settings)
    made = [await create(capped, url=f"{receiver.base_url}/cap{i}") for i in range(2)]
    assert [response.status_code for response in made] == [201, 201]
    refused = await create(capped, url=f"{receiver.base_url}/cap3")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "too_many_endpoints"
    assert len((await capped.service.client.get("/webhook-endpoints")).json()["items"]) == 2
    assert (await create(capped, headers=SECOND, url=f"{receiver.base_url}/b")).status_code == 201
    path = f"/webhook-endpoints/{made[0].json()['id']}"
    assert (await capped.service.client.delete(path)).status_code == 204
    assert (await create(capped, url=f"{receiver.base_url}/cap3")).status_code == 201
