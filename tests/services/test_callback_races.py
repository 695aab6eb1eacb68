"""Terminal callbacks racing a poll that writes the same task (PostgreSQL), on both paths."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository
from app.callback_urls import sign
from app.db import create_engine, create_session_factory, statement_commits
from app.models import Task, utcnow
from app.services import callbacks
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

PATHS = ["one statement", "general"]


class Webhook:
    """`receive_callback` as the API runs it, with the single statement turned off
    for the tasks that must take the general path."""

    def __init__(
        self, url: str, engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.engine = engine
        self.settings = make_settings(url, tmp_path, confirm_callbacks=True)
        self.general: set[str] = set()
        real = callbacks._confirm_in_one_statement

        async def one_statement(db: Any, task_id: str, raw: bytes) -> Any:
            return None if task_id in self.general else await real(db, task_id, raw)

        monkeypatch.setattr(callbacks, "_confirm_in_one_statement", one_statement)

    def call(self, task: Task, reported: str, path: str) -> Callable[[], Awaitable[str]]:
        """A delivery of `reported` for `task` through `path`; its outcome when awaited."""
        if path == "general":
            self.general.add(task.id)
        upstream_id = task.upstream_task_id or "task-unified-1757156493-none"
        body = dumps(task_body(reported, upstream_id=upstream_id))

        async def deliver() -> str:
            async with statement_commits(self.engine) as db:
                received = await callbacks.receive_callback(
                    db, self.settings, task.id, sign(task.id, WEBHOOK_SECRET), body
                )
            return received.outcome.value

        return deliver


async def while_a_poll_writes(
    engine: AsyncEngine,
    write: Callable[[Any], Awaitable[None]],
    deliveries: Sequence[Callable[[], Awaitable[str]]],
) -> list[str]:
    """Run `deliveries` while another transaction's `write` holds their rows uncommitted;
    once each waits on a row lock, the write commits. Their outcomes."""
    async with engine.connect() as poll:
        await write(poll)
        running = [asyncio.create_task(delivery()) for delivery in deliveries]
        for _ in range(250):  # until every delivery waits on a row lock
            async with engine.connect() as probe:
                waiting = await probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )
                if waiting.scalar_one() >= len(deliveries):
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the deliveries never waited on the rows")
        await poll.commit()
    return list(await asyncio.gather(*running))


async def request_columns(engine: AsyncEngine, task_id: str) -> Any:
    """A task's confirmation request columns, read fresh."""
    async with engine.connect() as db:
        query = text(
            "SELECT confirm_requested_at, next_poll_at, poll_lease_until FROM tasks WHERE id = :id"
        )
        return (await db.execute(query, {"id": task_id})).one()


async def delivered(engine: AsyncEngine, task_id: str) -> list[str]:
    """The outcomes recorded for a task's deliveries."""
    async with engine.connect() as db:
        query = text("SELECT outcome FROM callback_deliveries WHERE task_id = :id")
        return list((await db.execute(query, {"id": task_id})).scalars())


async def test_a_callback_racing_a_settling_poll_is_recorded_as_the_general_path_records_it(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `completed` callback whose write waits on a poll that fails the task is an
    `anomaly` on both paths: decided on the row after the wait."""
    engine = create_engine(postgres_database)
    webhook = Webhook(postgres_database, engine, tmp_path, monkeypatch)
    try:
        async with create_session_factory(engine)() as session:
            tasks = [await make_task(session, status="processing") for _ in PATHS]

        async def fail(poll: Any) -> None:
            for task in tasks:
                query = text("UPDATE tasks SET status = 'failed' WHERE id = :id")
                await poll.execute(query, {"id": task.id})

        pairs = zip(tasks, PATHS, strict=True)
        calls = [webhook.call(task, "completed", path) for task, path in pairs]
        outcomes = await while_a_poll_writes(engine, fail, calls)
        recorded = [await delivered(engine, task.id) for task in tasks]
    finally:
        await engine.dispose()
    assert (outcomes, recorded) == (["anomaly", "anomaly"], [["anomaly"], ["anomaly"]])


@pytest.mark.parametrize("path", PATHS)
async def test_a_callback_arriving_while_its_polls_answer_is_applied_keeps_its_request(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The poll's answer (still processing) predates a `completed` callback that arrives
    while that answer is being applied: the callback's confirmation request survives."""
    engine = create_engine(postgres_database)
    webhook = Webhook(postgres_database, engine, tmp_path, monkeypatch)
    now = utcnow()
    claimed = now - timedelta(seconds=2)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(
                session,
                status="processing",
                confirm_requested_at=now - timedelta(seconds=5),  # answered by this poll
                poll_claimed_at=claimed,
                poll_lease_until=now + timedelta(seconds=60),
            )

        async def finish(poll: Any) -> None:  # the worker's apply, not yet committed
            await repository.finish_poll(
                poll,
                task.id,
                claimed_at=claimed,
                next_poll_at=now + timedelta(minutes=15),
                values={"poll_attempts": 1},
            )

        (outcome,) = await while_a_poll_writes(
            engine, finish, [webhook.call(task, "completed", path)]
        )
        row = await request_columns(engine, task.id)
        recorded = await delivered(engine, task.id)
    finally:
        await engine.dispose()
    assert (outcome, recorded) == ("confirming", ["confirming"])
    assert row.confirm_requested_at is not None
    assert row.next_poll_at == row.confirm_requested_at  # due now, not in 15 minutes


@pytest.mark.parametrize("path", PATHS)
async def test_a_poll_finishing_after_the_callback_keeps_the_callbacks_request(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The other order: the callback's request is written first and the poll's release
    waits on it; the poll predates the news, so it leaves the request waiting."""
    engine = create_engine(postgres_database)
    webhook = Webhook(postgres_database, engine, tmp_path, monkeypatch)
    now = utcnow()
    claimed = now - timedelta(seconds=2)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(
                session,
                status="processing",
                poll_claimed_at=claimed,
                poll_lease_until=now + timedelta(seconds=60),
            )
        assert await webhook.call(task, "completed", path)() == "confirming"
        async with engine.begin() as poll:
            waiting = await repository.finish_poll(
                poll,
                task.id,
                claimed_at=claimed,
                next_poll_at=now + timedelta(minutes=15),
                values={"poll_attempts": 1},
            )
        row = await request_columns(engine, task.id)
    finally:
        await engine.dispose()
    assert waiting is True
    assert (row.confirm_requested_at is not None, row.poll_lease_until) == (True, None)
