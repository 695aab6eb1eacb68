"""Defects found by attacking the event log: forged cursors and reused positions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from app.config import Settings
from app.events import repository as event_repository
from app.models import utcnow
from tests.api.test_events_api import feed, feed_holding
from tests.api.test_webhooks import Stack, build_stack
from tests.conftest import make_settings
from tests.factories import make_image, make_task

pytestmark = pytest.mark.asyncio(loop_scope="session")

# 19 digits match the cursor pattern but do not fit the BIGINT columns they are compared to.
OVERFLOWING_CURSOR = "9999999999999999999.9999999999999999999"


@pytest_asyncio.fixture(loop_scope="session")
async def stack(service_factory: Any, database_url: str, tmp_path: Path) -> Stack:
    """The service and its simulator, callbacks applied as they come, on both databases."""
    settings: Settings = make_settings(database_url, tmp_path, confirm_callbacks=False)
    return await build_stack(service_factory, settings)


async def test_a_forged_overflowing_cursor_is_a_422_on_the_feed(stack: Stack) -> None:
    """Defect: `after` with 19-digit parts passes the pattern and crashes the query (500)."""
    response = await stack.service.client.get("/events", params={"after": OVERFLOWING_CURSOR})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "after"


async def test_a_forged_overflowing_last_event_id_is_a_422_on_the_stream(stack: Stack) -> None:
    """Defect: the stream accepts the cursor, answers 200, then fails in its first read."""
    headers = {"Last-Event-ID": OVERFLOWING_CURSOR}
    async with stack.service.client.stream("GET", "/events/stream", headers=headers) as response:
        assert response.status_code == 422
        body = (await response.aread()).decode()
    assert "Last-Event-ID" in body


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_cursor_kept_across_a_full_prune_sees_every_new_event(stack: Stack) -> None:
    """Defect: on SQLite, pruning every event lets `seq` start again at 1, under old cursors."""
    await stack.submit("before the quiet month")
    await stack.submit("also before")
    cursor = (await feed_holding(stack, 2))["next_cursor"]
    async with stack.service.runtime.engine.begin() as db:
        pruned = await event_repository.prune_events(
            db, before=utcnow() + timedelta(days=1), limit=100
        )
    assert pruned == 2
    fresh = [await stack.submit(f"after the quiet month {n}") for n in range(3)]
    served = [event["data"]["id"] for event in (await feed(stack, after=cursor))["items"]]
    assert served == [task["id"] for task in fresh]


async def test_retrying_a_failed_image_tells_the_log_the_task_is_no_longer_settled(
    stack: Stack,
) -> None:
    """Defect: POST /tasks/{id}/image/retry turns a settled task unsettled with no event."""
    async with stack.service.runtime.sessions() as session:
        task = await make_task(session, status="completed", image_status="failed")
        await make_image(session, task.id, status="failed", error_code="http_403")
    assert (await stack.task(task.id))["settled"] is True
    retried = await stack.service.client.post(f"/tasks/{task.id}/image/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["settled"] is False
    items: list[dict[str, Any]] = []
    for _ in range(200):
        response = await stack.service.client.get(f"/tasks/{task.id}/events")
        items = response.json()["items"]
        if items:
            break
        await asyncio.sleep(0.05)
    assert items, "no event tells that the task was reopened"
    assert items[0]["data"]["settled"] is False


def _position(cursor: str) -> tuple[int, int]:
    txid, seq = cursor.split(".")
    return int(txid), int(seq)


async def test_a_filtered_page_moves_the_cursor_past_the_events_it_scanned(stack: Stack) -> None:
    """Defect: `types=` pages that match nothing hand back the same cursor, so every poll
    scans again every event since the last match (no index has the type)."""
    await stack.submit("first")
    start = (await feed_holding(stack, 1, types="task.created"))["next_cursor"]
    await stack.submit("second")
    await stack.submit("third")
    scanned = (await feed_holding(stack, 2, types="task.created", after=start))["next_cursor"]
    empty = await feed(stack, types="task.failed", after=start)
    assert empty["items"] == []
    assert _position(empty["next_cursor"]) >= _position(scanned)


async def test_a_bad_after_on_the_stream_is_refused_naming_after(stack: Stack) -> None:
    """Defect: GET /events/stream?after=garbage answers 422 naming Last-Event-ID, a header
    the caller never sent."""
    response = await stack.service.client.get("/events/stream", params={"after": "evt_x"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "after"
