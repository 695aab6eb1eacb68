"""Two service processes on one PostgreSQL database: a waiter on one is woken by a
change the other applies (LISTEN/NOTIFY), for Prefer: wait and for the SSE stream."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.e2e.pool import StackPool
from tests.e2e.stack import API_TOKEN, Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def follow_stream(
    client: httpx.AsyncClient, path: str, until: str, received: list[tuple[dict[str, Any], float]]
) -> None:
    """Read SSE events into `received` (with their arrival time) until an event of type `until`."""
    headers = {"Accept": "text/event-stream"}
    async with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                received.append((event, time.time()))
                if event["type"] == until:
                    return


def lag(event: dict[str, Any], arrived: float) -> float:
    return arrived - datetime.fromisoformat(event["created_at"]).timestamp()


async def settling_event(stack: Stack, task_id: str) -> tuple[str, datetime]:
    rows = await stack.sql(
        "SELECT type, created_at FROM events WHERE task_id = :id ORDER BY seq DESC LIMIT 1",
        id=task_id,
    )
    kind, created = rows[0]
    return str(kind), created


@pytest.mark.postgres
async def test_a_waiter_on_one_process_is_woken_by_a_change_on_another(
    postgres_stacks: StackPool,
) -> None:
    """Process A takes the callbacks and downloads; process B, running no loops, answers a
    Prefer: wait and streams the task's events, woken only by A's commits."""
    stack = await postgres_stacks.start()
    replica = await stack.start_extra_service(RUN_BACKGROUND=False)
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(
        base_url=replica, headers=headers, timeout=90, trust_env=False
    ) as other:
        task = await stack.submit("a lighthouse")
        received: list[tuple[dict[str, Any], float]] = []
        streaming = asyncio.create_task(
            follow_stream(other, f"/tasks/{task['id']}/events", "image.stored", received)
        )
        waited = await other.get(f"/tasks/{task['id']}", headers={"Prefer": "wait=60"})
        answered = time.time()
        await asyncio.wait_for(streaming, 60)

    assert waited.status_code == 200
    assert waited.headers["preference-applied"] == "wait=60"
    body = waited.json()
    # Only a wake-up from A can have made B read the settled task before its 60 s ran out.
    assert body["settled"] is True
    assert body["image"]["status"] == "stored"
    assert body["image"]["url"] == f"{replica}/tasks/{task['id']}/image"
    kind, settled_at = await settling_event(stack, task["id"])
    assert kind == "image.stored"
    told = [event["type"] for event, _ in received]
    assert told[0] == "task.created"
    assert told[-2:] == ["task.completed", "image.stored"]
    assert set(told[1:-2]) <= {"task.processing"}
    assert received[-1][0]["data"]["settled"] is True
    assert stack.logs("image_stored") != []  # process A stored it
    # Reported, not asserted: from the event's timestamp (taken just before its commit)
    # to the answer arriving in the test, across two processes.
    lags = {event["type"]: round(lag(event, at) * 1000, 1) for event, at in received}
    wait_lag = round((answered - settled_at.timestamp()) * 1000, 1)
    print(f"\nwake-up latency ms: wait={wait_lag} stream={lags}")


async def test_open_streams_end_cleanly_when_the_service_stops(stacks: StackPool) -> None:
    """SIGTERM ends a live stream with a complete response, and the service stops gracefully."""
    stack = await stacks.start()
    task = await stack.submit("a short story")
    lines: list[str] = []
    async with stack.client.stream(
        "GET", "/events/stream", headers={"Accept": "text/event-stream"}, timeout=60
    ) as response:
        stream = response.aiter_lines()
        async for line in stream:
            lines.append(line)
            if line.startswith("data: ") and task["id"] in line:
                break
        stopping = asyncio.create_task(stack.stop_service())
        # A stream cut off mid-response would raise here instead of ending.
        lines += [line async for line in stream]
    assert await stopping == -signal.SIGTERM  # uvicorn re-raises the signal it handled
    assert any(task["id"] in line for line in lines)
