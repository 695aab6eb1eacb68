"""/events, /tasks/{id}/events, Prefer: wait and the SSE stream, through the real app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn

from app import repository
from app.config import Settings
from app.models import Image, utcnow
from app.services import events
from tests.api.test_webhooks import Stack, build_stack, hook
from tests.conftest import make_settings
from tests.helpers import dumps, task_body
from tests.ports import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECOND_TOKEN = "second-token-bbbbbbbbbbbbbbbbbb"


@pytest_asyncio.fixture(loop_scope="session")
async def stack(service_factory: Any, database_url: str, tmp_path: Path) -> Stack:
    """Callbacks applied as they come (no confirmation), on both databases."""
    settings: Settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    return await build_stack(service_factory, settings)


async def callback(stack: Stack, task: dict[str, Any], status: str, **body: Any) -> None:
    raw = dumps(task_body(status, upstream_id=task["upstream_task_id"], **body))
    response = await stack.service.client.post(hook(task["id"]), content=raw)
    assert response.status_code == 200, response.text


async def feed(stack: Stack, **params: Any) -> dict[str, Any]:
    response = await stack.service.client.get("/events", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def feed_holding(stack: Stack, count: int, **params: Any) -> dict[str, Any]:
    """The feed once it holds `count` events: on PostgreSQL an event is served only once
    every transaction older than it has ended, anywhere on the server."""
    for _ in range(600):
        page = await feed(stack, **params)
        if len(page["items"]) >= count:
            return page
        await asyncio.sleep(0.05)
    raise AssertionError(f"the feed never held {count} events: {page}")


async def test_the_feed_pages_through_the_callers_events_in_order(stack: Stack) -> None:
    """Three submissions, two per page: each task.created once, then an empty page."""
    tasks = [await stack.submit(f"cat {n}") for n in range(3)]
    await feed_holding(stack, 3)
    first = await feed(stack, limit=2)
    assert [event["data"]["id"] for event in first["items"]] == [t["id"] for t in tasks[:2]]
    assert first["has_more"] is True
    second = await feed(stack, limit=2, after=first["next_cursor"])
    assert [event["data"]["id"] for event in second["items"]] == [tasks[2]["id"]]
    assert second["has_more"] is False
    empty = await feed(stack, after=second["next_cursor"])
    assert empty["items"] == []
    assert empty["next_cursor"] == second["next_cursor"]
    event = first["items"][0]
    assert event["id"].startswith("evt_")
    assert event["type"] == "task.created"
    assert set(event) == {"id", "type", "created_at", "data"}


async def test_the_feed_shows_only_the_callers_tasks_unless_scope_is_all(stack: Stack) -> None:
    """Another token's task is left out by default and included with scope=all."""
    mine = await stack.submit("mine")
    other = await stack.service.client.post(
        "/tasks", json={"prompt": "theirs"}, headers={"Authorization": f"Bearer {SECOND_TOKEN}"}
    )
    assert other.status_code == 202
    everything = {
        event["data"]["id"] for event in (await feed_holding(stack, 2, scope="all"))["items"]
    }
    default = {event["data"]["id"] for event in (await feed(stack))["items"]}
    assert default == {mine["id"]}
    assert everything == {mine["id"], other.json()["id"]}


async def test_types_filter_and_bad_parameters_are_refused(stack: Stack) -> None:
    """types keeps only those events; an unknown type or cursor is a 422 naming the field."""
    task = await stack.submit()
    await callback(stack, task, "failed", error={"message": "no"})
    failed = await feed_holding(stack, 1, types="task.failed")
    assert [event["type"] for event in failed["items"]] == ["task.failed"]
    for params, field in (({"types": "task.exploded"}, "types"), ({"after": "evt_x"}, "after")):
        response = await stack.service.client.get("/events", params=params)
        assert response.status_code == 422
        assert response.json()["error"]["details"][0]["field"] == field
    assert (await stack.service.client.get("/events", params={"scope": "x"})).status_code == 422


async def test_a_tasks_story_is_told_oldest_first_with_absolute_image_urls(
    stack: Stack,
) -> None:
    """created, processing, completed; image URLs are made absolute for the caller."""
    task = await stack.submit()
    await callback(stack, task, "processing", progress=30)
    await callback(stack, task, "completed")
    items = (await feed_holding(stack, 3))["items"]
    story = (await stack.service.client.get(f"/tasks/{task['id']}/events")).json()["items"]
    # The task's story is the feed's events, each with its webhook deliveries (none here).
    assert [event.pop("deliveries") for event in story] == [[], [], []]
    assert items == story
    assert [event["type"] for event in items] == [
        "task.created",
        "task.processing",
        "task.completed",
    ]
    assert items[1]["data"]["progress"] == 30
    stored = await stack.service.sql(
        "SELECT data FROM events WHERE task_id = :id ORDER BY seq", id=task["id"]
    )
    assert len(stored) == 3
    missing = await stack.service.client.get("/tasks/tsk_nope/events")
    assert missing.status_code == 404


async def test_image_urls_in_events_are_root_relative_when_stored_and_absolute_when_served(
    stack: Stack,
) -> None:
    """A stored image's URL is kept as /tasks/{id}/image and served on the request's base."""
    submitted = await stack.submit()
    runtime = stack.service.runtime
    async with runtime.sessions() as session:
        task = await repository.get_task(session, submitted["id"])
    assert task is not None
    now = utcnow()
    image = Image(task_id=task.id, position=0, status="stored", created_at=now, updated_at=now)
    async with runtime.engine.begin() as db:
        await events.record(db, events.EventType.IMAGE_STORED, task, [image], now=now)
    kept = await stack.service.sql("SELECT data FROM events WHERE type = 'image.stored'")
    data = kept[0][0] if isinstance(kept[0][0], dict) else json.loads(kept[0][0])
    assert data["image"]["url"] == f"/tasks/{task.id}/image"
    page = await feed_holding(stack, 2)
    served = page["items"][-1]["data"]
    assert served["image"]["url"] == f"https://imagetasks.test/tasks/{task.id}/image"
    assert served["images"][0]["url"] == served["image"]["url"]


async def test_wait_answers_as_soon_as_the_task_settles(stack: Stack) -> None:
    """A GET waiting 60 s answers settled once a callback fails the task meanwhile."""
    task = await stack.submit()
    waiting = asyncio.create_task(
        stack.service.client.get(f"/tasks/{task['id']}", headers={"Prefer": "wait=60"})
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await callback(stack, task, "failed", error={"message": "no"})
    response = await asyncio.wait_for(waiting, 55)
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=60"
    # Had it only woken at the end of its wait it would still say what it read first.
    assert response.json()["status"] == "failed"
    assert response.json()["settled"] is True


async def test_wait_times_out_with_the_current_state(stack: Stack) -> None:
    """Nothing happens within 1 s: the pending task comes back, the preference applied."""
    task = await stack.submit()
    response = await stack.service.client.get(f"/tasks/{task['id']}", headers={"Prefer": "wait=1"})
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=1"
    assert response.json()["status"] == "pending"
    assert response.json()["settled"] is False
    plain = await stack.service.client.get(f"/tasks/{task['id']}")
    assert "preference-applied" not in plain.headers


async def test_post_with_wait_answers_once_the_new_task_settles(stack: Stack) -> None:
    """POST /tasks with Prefer: wait answers after a callback completes and fails nothing."""
    posting = asyncio.create_task(
        stack.service.client.post(
            "/tasks", json={"prompt": "p"}, headers={"Prefer": "respond-async, wait=60"}
        )
    )
    created: list[dict[str, Any]] = []
    for _ in range(200):
        created = (await stack.service.client.get("/tasks")).json()["items"]
        if created and created[0]["upstream_task_id"]:
            break
        await asyncio.sleep(0.05)
    await callback(stack, created[0], "cancelled")
    response = await asyncio.wait_for(posting, 55)
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=60"
    assert response.json()["status"] == "cancelled"
    assert response.json()["settled"] is True


@pytest.mark.parametrize("prefer", ["wait=0", "wait=soon", "wait=-3"])
async def test_a_bad_wait_is_refused_before_anything_is_submitted(
    stack: Stack, prefer: str
) -> None:
    """422 naming Prefer, and no task recorded."""
    response = await stack.service.client.post(
        "/tasks", json={"prompt": "p"}, headers={"Prefer": prefer}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "Prefer"
    assert (await stack.service.client.get("/tasks")).json()["items"] == []


async def test_a_long_wait_is_capped_at_60_seconds(stack: Stack) -> None:
    """wait=600 is honoured as wait=60 (a settled task answers at once)."""
    task = await stack.submit()
    await callback(stack, task, "failed", error={"message": "no"})
    response = await stack.service.client.get(
        f"/tasks/{task['id']}", headers={"Prefer": "wait=600"}
    )
    assert response.headers["preference-applied"] == "wait=60"
    assert response.json()["settled"] is True


# --- the live stream, over a real HTTP server ---------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def live(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The same app served by uvicorn on a loopback port (streams need a real server)."""
    port = free_port()
    config = uvicorn.Config(stack.service.app, port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    headers = dict(stack.service.client.headers)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
    ) as client:
        yield client
    stack.service.runtime.events.shut_down()
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, 30)


class SseReader:
    """Reads SSE messages (id, event, data) and comments from a streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> dict[str, str]:
        """The next message or comment block."""
        message: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if message:
                    return message
                continue
            if line.startswith(":"):
                message["comment"] = line[1:].strip()
                continue
            name, _, value = line.partition(": ")
            message[name] = value
        raise EOFError("the stream ended")

    async def next_event(self) -> dict[str, str]:
        """The next message that carries an event (skipping comments and retry)."""
        while True:
            message = await asyncio.wait_for(self.next(), 30)
            if "event" in message:
                return message


async def test_the_stream_sends_new_events_and_resumes_after_last_event_id(
    stack: Stack, live: httpx.AsyncClient
) -> None:
    """Events arrive as they commit; a reconnect with Last-Event-ID gets only the later ones."""
    task = await stack.submit()
    async with live.stream("GET", "/events/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = SseReader(response)
        created = await reader.next_event()
        assert created["event"] == "task.created"
        await callback(stack, task, "processing", progress=5)
        processing = await reader.next_event()
        assert processing["event"] == "task.processing"
        assert json.loads(processing["data"])["data"]["progress"] == 5
    await callback(stack, task, "failed", error={"message": "no"})
    headers = {"Last-Event-ID": processing["id"]}
    async with live.stream("GET", "/events/stream", headers=headers) as response:
        resumed = await SseReader(response).next_event()
    assert resumed["event"] == "task.failed"
    assert json.loads(resumed["data"])["type"] == "task.failed"


async def test_a_tasks_stream_sends_heartbeats_and_ends_on_shutdown(
    stack: Stack, live: httpx.AsyncClient
) -> None:
    """Accept: text/event-stream on a task's events: its story, comments while idle, then
    a clean end when the process stops."""
    stack.service.runtime.events.heartbeat_seconds = 0.2
    task = await stack.submit()
    headers = {"Accept": "text/event-stream"}
    async with live.stream("GET", f"/tasks/{task['id']}/events", headers=headers) as response:
        reader = SseReader(response)
        assert (await reader.next_event())["event"] == "task.created"
        beat = await asyncio.wait_for(reader.next(), 30)
        assert beat == {"comment": "heartbeat"}
        stack.service.runtime.events.shut_down()
        with pytest.raises(EOFError):
            await asyncio.wait_for(reader.next(), 30)
