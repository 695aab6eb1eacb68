"""Tasks waiting for their outcome, and the failed callbacks that settle them at once
(no image to download), shared by the wait-latency and fan-out benchmarks."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from app.api.deps import caller_id
from app.callback_urls import WEBHOOK_PATH, sign
from app.db import create_engine
from app.ids import ulid
from app.webhooks import repository as webhook_repository
from app.webhooks import signing
from bench.databases import insert_tasks, task_row
from bench.stack import API_TOKEN, WEBHOOK_SECRET

OWNER = caller_id(API_TOKEN)  # the bench token's tasks: its endpoints hear of them


def seed_processing(url: str, count: int, owner: str = OWNER) -> list[tuple[str, str]]:
    """`count` processing tasks of `owner`; their (task id, upstream id)."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    tasks = [(f"tsk_{ulid()}", f"task-unified-{secrets.token_hex(6)}") for _ in range(count)]
    rows = [
        task_row(
            id=task_id,
            status="processing",
            progress=50,
            owner=owner,
            upstream_task_id=upstream,
            created_at=now,
            updated_at=now,
            last_event_at=now,
            next_poll_at=now + timedelta(days=1),
        )
        for task_id, upstream in tasks
    ]
    asyncio.run(insert_tasks(url, rows))
    return tasks


def failed_callback(task_id: str, upstream: str) -> tuple[str, bytes]:
    """The path and body of the provider's terminal `failed` callback for this task."""
    data = {"id": upstream, "status": "failed", "error": {"code": "bench", "message": "bench"}}
    body = json.dumps({"code": 200, "data": data}, separators=(",", ":")).encode()
    return f"{WEBHOOK_PATH}/{task_id}/{sign(task_id, WEBHOOK_SECRET)}", body


async def send_failed(client: httpx.AsyncClient, task_id: str, upstream: str) -> float:
    """POST the failed callback; the wall-clock time it was answered."""
    path, body = failed_callback(task_id, upstream)
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    response.raise_for_status()
    return time.time()


def add_endpoint(url: str, target: str, types: list[str], owner: str = OWNER) -> str:
    """Subscribe `target` to `types` of `owner`'s events, as POST /webhook-endpoints does."""
    endpoint_id = "we_" + ulid()
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": endpoint_id,
        "owner": owner,
        "url": target,
        "event_types": webhook_repository.type_list(types),
        "description": "bench",
        "enabled": True,
        "disabled_reason": None,
        "secret": signing.new_secret(),
        "created_at": now,
        "updated_at": now,
    }

    async def insert() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as db:
                await webhook_repository.insert_endpoint(db, values)
        finally:
            await engine.dispose()

    asyncio.run(insert())
    return endpoint_id


def settled_at(url: str, kind: str = "task.failed") -> dict[str, float]:
    """Each task's `kind` event time (taken just before its commit), as a Unix time."""

    async def read() -> dict[str, float]:
        engine = create_engine(url)
        try:
            async with engine.connect() as db:
                rows = await db.execute(
                    text("SELECT task_id, created_at FROM events WHERE type = :kind"),
                    {"kind": kind},
                )
                return {str(t): _unix(c) for t, c in rows.all()}
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _unix(value: datetime | str) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
