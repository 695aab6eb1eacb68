"""Confirmation off, PostgreSQL: a batch that fails (its connection dropped before
COMMIT, one callback's write raising) writes nothing, and every callback in it is
still applied exactly once by the general path; batches of both kinds (replicas
with confirmation on and off) over the same tasks never deadlock; and the event a
batched move writes shows the task as GET /tasks/{id} does."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api.deps import caller_id
from app.callback_urls import WEBHOOK_PATH, sign
from app.config import Settings
from app.db import create_engine, create_session_factory, statement_commits
from app.errors import DomainError
from app.models import Task
from app.services import events
from app.services.callback_batches import ConfirmationBatches, SnapshotBatches
from app.services.callbacks import apply_in_batch, receive_callback, receive_in_batch
from app.services.snapshot_batches import BatchDecision, SnapshotCallback, apply_batch
from tests.conftest import API_TOKEN, WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]


class WatchedBatches(SnapshotBatches):
    """Batches that keep what failed them; `drop_connection`: the next batch's
    connection is ended by the server after its writes, before its COMMIT."""

    def __init__(self, engine: AsyncEngine, *, in_flight: int = 1) -> None:
        super().__init__(engine, in_flight=in_flight)
        self.failures: list[Exception] = []
        self.drop_connection = False

    def _failed(self, exc: Exception, size: int) -> None:
        self.failures.append(exc)
        super()._failed(exc, size)

    async def _run(
        self, callbacks: list[SnapshotCallback], now: datetime
    ) -> dict[str, BatchDecision]:
        if not self.drop_connection:
            return await super()._run(callbacks, now)
        self.drop_connection = False
        async with self.engine.connect() as db:
            try:
                async with db.begin():
                    decided = await apply_batch(db, callbacks, now=now)
                    await db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
                    return decided
            except BaseException:
                await db.invalidate()
                raise


class WatchedConfirmations(ConfirmationBatches):
    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.failures: list[Exception] = []

    def _failed(self, exc: Exception, size: int) -> None:
        self.failures.append(exc)
        super()._failed(exc, size)


async def _answer(
    settings: Settings, engine: AsyncEngine, batches: SnapshotBatches, task_id: str, body: bytes
) -> Any:
    """What the webhook answers: the batch first, the general path when it declines."""
    token = sign(task_id, WEBHOOK_SECRET)
    try:
        received = await apply_in_batch(batches, settings, task_id, token, body)
        if received is None:
            async with statement_commits(engine) as db:
                received = await receive_callback(db, settings, task_id, token, body)
                await db.commit()
    except DomainError as exc:
        return exc.status_code
    return received.outcome.value


async def _written(engine: AsyncEngine, task_id: str) -> tuple[Any, ...]:
    """The task's status and how many events, deliveries and images it has."""
    async with engine.connect() as db:

        async def count(table: str) -> int:
            sql = f"SELECT count(*) FROM {table} WHERE task_id = :id"  # noqa: S608
            return int((await db.execute(text(sql), {"id": task_id})).scalar_one())

        status = (
            await db.execute(text("SELECT status FROM tasks WHERE id = :id"), {"id": task_id})
        ).scalar_one()
        return (
            status,
            await count("events"),
            await count("callback_deliveries"),
            await count("images"),
        )


async def _processing_tasks(engine: AsyncEngine, count: int, **fields: Any) -> list[Task]:
    async with create_session_factory(engine)() as session:
        return [await make_task(session, status="processing", n=2, **fields) for _ in range(count)]


def _completed(task: Task) -> bytes:
    return dumps(task_body("completed", upstream_id=str(task.upstream_task_id)))


async def test_a_batch_whose_connection_drops_before_commit_leaves_each_callback_to_apply_once(
    postgres_database: str, tmp_path: Path
) -> None:
    """The server ends the batch's connection after its writes: none of them commits,
    and each callback is then applied by the general path, once: one event, one
    delivery and its images each."""
    engine = create_engine(postgres_database)
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=False)
    batches = WatchedBatches(engine)
    batches.drop_connection = True
    try:
        tasks = await _processing_tasks(engine, 6)
        answers = await asyncio.gather(
            *(_answer(settings, engine, batches, t.id, _completed(t)) for t in tasks)
        )
        assert len(batches.failures) == 1  # the batch did fail, and was retried
        assert answers == ["applied"] * len(tasks)
        for task in tasks:
            assert await _written(engine, task.id) == ("completed", 1, 1, 2)
    finally:
        await engine.dispose()


async def test_one_callback_failing_its_batch_costs_the_others_nothing(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task's event cannot be written: the batch writes nothing, that callback
    fails alone (as on the general path) and every other is applied, once."""
    engine = create_engine(postgres_database)
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=False)
    batches = WatchedBatches(engine)
    try:
        tasks = await _processing_tasks(engine, 6)
        poisoned = tasks[3].id
        real_task_data = events.task_data

        # Both paths build every event's data here.
        def task_data(task: Any, images: Any) -> dict[str, Any]:
            if task.id == poisoned:
                raise RuntimeError("this task's event cannot be written")
            return real_task_data(task, images)

        monkeypatch.setattr(events, "task_data", task_data)

        async def answer(task: Task) -> Any:
            try:
                return await _answer(settings, engine, batches, task.id, _completed(task))
            except RuntimeError:
                return 500

        answers = await asyncio.gather(*(answer(t) for t in tasks))
        assert len(batches.failures) == 1
        assert answers == ["applied" if t.id != poisoned else 500 for t in tasks]
        for task in tasks:
            expected = ("processing", 0, 0, 0) if task.id == poisoned else ("completed", 1, 1, 2)
            assert await _written(engine, task.id) == expected
    finally:
        await engine.dispose()


async def test_batches_with_confirmation_on_and_off_over_the_same_tasks_never_deadlock(
    postgres_database: str, tmp_path: Path
) -> None:
    """Two replicas, one confirming terminal callbacks and one applying them, get
    callbacks about the same tasks in every order at once: both lock in id order, so
    no batch fails and the general path never has to take over."""
    engine_off, engine_on = create_engine(postgres_database), create_engine(postgres_database)
    off = make_settings(postgres_database, tmp_path, confirm_callbacks=False)
    on = make_settings(postgres_database, tmp_path, confirm_callbacks=True)
    applying = WatchedBatches(engine_off, in_flight=2)
    confirming = WatchedConfirmations(engine_on)
    shuffle = random.Random(16).shuffle
    try:
        tasks = await _processing_tasks(engine_off, 40)

        async def confirm(task: Task, body: bytes) -> Any:
            token = sign(task.id, WEBHOOK_SECRET)
            received = await receive_in_batch(confirming, on, task.id, token, body)
            return received.outcome.value if received else None

        calls = []
        applied_to: set[str] = set()  # tasks that got a callback on the applying replica
        for round_ in range(5):
            order = tasks[:]
            shuffle(order)
            for position, task in enumerate(order):
                status = ("completed", "failed")[(round_ + position) % 2]
                body = dumps(task_body(status, upstream_id=str(task.upstream_task_id)))
                if (round_ + position) % 3:
                    calls.append(_answer(off, engine_off, applying, task.id, body))
                    applied_to.add(task.id)
                else:
                    calls.append(confirm(task, body))
        answers = await asyncio.gather(*calls)
        assert applying.failures == []
        assert confirming.failures == []
        assert None not in answers
        for task in tasks:  # a task with a callback applied moved once, by one event
            status, event_count, _, _ = await _written(engine_off, task.id)
            moved = task.id in applied_to
            assert (status != "processing", event_count) == (moved, int(moved))
    finally:
        await engine_off.dispose()
        await engine_on.dispose()


async def test_a_batched_completion_event_shows_the_task_as_get_does(
    postgres_database: str, tmp_path: Path, service_factory: Any
) -> None:
    """Through the route, callbacks arriving together: each task.completed event's
    data is what GET /tasks/{id} answers right after (three images asked for, one
    link given; odd usage and metadata)."""
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=False)
    service = await service_factory(settings, httpx.MockTransport(lambda _: httpx.Response(500)))
    async with create_session_factory(service.runtime.engine)() as session:
        tasks = [
            await make_task(
                session,
                status="processing",
                n=3,
                progress=30,
                owner=caller_id(API_TOKEN),
                webhook_url="https://caller.example.com/hook",
                meta={"nested": [1, {"é": None}]},
            )
            for _ in range(4)
        ]

    async def post(task: Task) -> Any:
        body = task_body("completed", upstream_id=str(task.upstream_task_id))
        body["usage"] = {"billing_rule": "règle", "credits_reserved": 1e300}
        body["data"]["estimated_time"] = 12
        path = f"{WEBHOOK_PATH}/{task.id}/{sign(task.id, WEBHOOK_SECRET)}"
        answer = await service.client.post(
            path, content=dumps(body), headers={"content-type": "application/json"}
        )
        return answer.json()

    answers = await asyncio.gather(*(post(t) for t in tasks))
    assert answers == [{"received": True, "outcome": "applied"}] * len(tasks)
    for task in tasks:
        shown = (await service.client.get(f"/tasks/{task.id}")).json()
        [(data,)] = await service.sql("SELECT data FROM events WHERE task_id = :id", id=task.id)
        assert data == shown
        assert len(shown["images"]) == 3
