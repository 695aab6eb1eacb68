"""The webhook when the server has dropped the pool's connections (PostgreSQL restarted,
an idle timeout, a failover): a callback is answered 200, or 503 so the provider
retries, never 500; and the callbacks after it find live connections again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.api.test_webhooks import Stack, build_stack, hook
from tests.conftest import make_settings
from tests.helpers import dumps, task_body
from tests.postgres import dsn

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

POOLED = 6  # connections left in the pool, all of them dropped by the server


async def _drop_pooled_connections(engine: AsyncEngine, url: str) -> None:
    """Fill the pool with `POOLED` connections, then have the server end every one."""
    connections = [await engine.connect() for _ in range(POOLED)]
    pids = []
    for connection in connections:
        raw = await connection.get_raw_connection()
        pids.append(raw.driver_connection.get_server_pid())  # type: ignore[union-attr]
    for connection in connections:
        await connection.close()
    admin = await asyncpg.connect(dsn(url))
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
        while await admin.fetchval(alive, pids):
            await asyncio.sleep(0.02)
    finally:
        await admin.close()


async def _setup(service_factory: Any, url: str, tmp_path: Path) -> tuple[Stack, httpx.AsyncClient]:
    stack = await build_stack(service_factory, make_settings(url, tmp_path))
    # A 500 is an answer here, not an exception in the test.
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack.service.app, raise_app_exceptions=False),
        base_url="https://imagetasks.test",
    )
    return stack, client


async def _callbacks_after_a_drop(
    service_factory: Any, url: str, tmp_path: Path, status: str
) -> tuple[Stack, list[tuple[str, httpx.Response]]]:
    stack, client = await _setup(service_factory, url, tmp_path)
    tasks = [await stack.submit(f"a cat {n}") for n in range(POOLED)]
    await _drop_pooled_connections(stack.service.runtime.engine, url)
    answers = []
    async with client:
        for task in tasks:
            body = dumps(task_body(status, upstream_id=task["upstream_task_id"], progress=40))
            answers.append((task["id"], await client.post(hook(task["id"]), content=body)))
    return stack, answers


@pytest.mark.parametrize("status", ["processing", "completed"])
async def test_callbacks_after_the_server_dropped_the_pool_are_never_answered_500(
    service_factory: Any, postgres_database: str, tmp_path: Path, status: str
) -> None:
    """The first callback may meet a dead connection: it is answered 503 (retry) or
    decided on a fresh one; those after it are served, each delivery recorded once."""
    stack, answers = await _callbacks_after_a_drop(
        service_factory, postgres_database, tmp_path, status
    )
    codes = [response.status_code for _, response in answers]
    assert set(codes[:1]) <= {200, 503}, answers[0][1].text
    assert codes[1:] == [200] * (len(codes) - 1), [r.text for _, r in answers]
    if codes[0] == 503:
        assert answers[0][1].json()["error"]["code"] == "database_unavailable"
    expected = "confirming" if status == "completed" else "applied"
    for (task_id, response), code in zip(answers, codes, strict=True):
        recorded = await stack.deliveries(task_id)
        assert [outcome for outcome, _ in recorded] == ([expected] if code == 200 else [])
        if code == 200:
            assert response.json() == {"received": True, "outcome": expected}
