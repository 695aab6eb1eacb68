"""PostgreSQL: the worker's answers decided together, at their edges: the same task
twice in one batch, and a batch of callbacks about the same tasks at the same time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update
from structlog.testing import capture_logs

from app.db import create_engine, create_session_factory
from app.models import Task, TaskStatus, utcnow
from app.repository import TASKS, PollClaim, TerminalCallback, confirm_in_batch
from app.schemas import Snapshot, SnapshotImage
from app.services.reconcile import Reconciler
from tests.conftest import _truncate, make_settings
from tests.factories import make_task
from tests.helpers import offline_reconciler

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]


def _reconciler(engine: Any, settings: Any) -> Reconciler:
    return offline_reconciler(create_session_factory(engine), settings)


async def _claimed_tasks(engine: Any, count: int) -> list[tuple[Task, PollClaim]]:
    now = utcnow()
    made = []
    async with create_session_factory(engine)() as session:
        for _ in range(count):
            task = await make_task(session, status="processing", confirm_requested_at=now)
            made.append(task)
    async with engine.begin() as db:
        await db.execute(
            update(TASKS)
            .where(TASKS.c.id.in_([t.id for t in made]))
            .values(poll_claimed_at=now, poll_lease_until=now + timedelta(seconds=60))
        )
    return [
        (task, PollClaim(task.id, task.upstream_task_id, task.created_at, 0, now, now))
        for task in made
    ]


async def _count(engine: Any, sql: str, task_id: str) -> int:
    async with engine.connect() as db:
        return int((await db.execute(text(sql), {"id": task_id})).scalar_one())


async def test_the_same_task_twice_in_a_batch_moves_once_with_one_event(
    postgres_database: str, tmp_path: Path
) -> None:
    """Two answers about one task in a batch (completed, then failed): as one by one,
    the first moves it and the second finds it settled; one event, one image row,
    no image queued for a task that failed."""
    await _truncate(postgres_database)
    engine = create_engine(postgres_database)
    reconciler = _reconciler(engine, make_settings(postgres_database, tmp_path))
    try:
        [(task, claim)] = await _claimed_tasks(engine, 1)
        upstream = task.upstream_task_id
        completed = Snapshot(
            TaskStatus.COMPLETED,
            upstream_id=upstream,
            images=(SnapshotImage("https://cdn.example.com/a.png"),),
        )
        failed = Snapshot(TaskStatus.FAILED, upstream_id=upstream, error_code="boom")
        await reconciler._apply_answers([(claim, failed), (claim, completed)])
        events = await _count(engine, "SELECT count(*) FROM events WHERE task_id = :id", task.id)
        images = await _count(engine, "SELECT count(*) FROM images WHERE task_id = :id", task.id)
        failed_now = await _count(
            engine, "SELECT count(*) FROM tasks WHERE id = :id AND status = 'failed'", task.id
        )
        # Answers are applied in task id order, the first of a task's first: it failed.
        assert (failed_now, events, images) == (1, 1, 0)
    finally:
        await engine.dispose()


async def test_answers_and_a_callback_batch_on_the_same_tasks_never_deadlock(
    postgres_database: str, tmp_path: Path
) -> None:
    """The worker's batch of answers and a batch of terminal callbacks (confirmation
    on) about the same tasks, again and again at once: both lock in id order, so one
    waits for the other; every task ends completed with one event."""
    await _truncate(postgres_database)
    engine = create_engine(postgres_database)
    reconciler = _reconciler(engine, make_settings(postgres_database, tmp_path))
    try:
        for _ in range(10):
            claimed = await _claimed_tasks(engine, 12)
            answers = [
                (
                    claim,
                    Snapshot(
                        TaskStatus.COMPLETED,
                        upstream_id=task.upstream_task_id,
                        images=(SnapshotImage("https://cdn.example.com/x.png"),),
                    ),
                )
                for task, claim in claimed
            ]
            callbacks = [
                TerminalCallback(task.id, task.upstream_task_id or "", "completed", "sha")
                for task, _ in reversed(claimed)
            ]

            async def callback_batch(callbacks: list[TerminalCallback]) -> None:
                async with engine.begin() as db:
                    await confirm_in_batch(db, sorted(callbacks, key=lambda c: c.task_id), utcnow())

            await asyncio.wait_for(
                asyncio.gather(reconciler._apply_answers(answers), callback_batch(callbacks)), 30
            )
            for task, _ in claimed:
                assert (
                    await _count(
                        engine,
                        "SELECT count(*) FROM tasks WHERE id = :id AND status = 'completed'"
                        " AND poll_lease_until IS NULL",
                        task.id,
                    )
                    == 1
                )
                assert (
                    await _count(engine, "SELECT count(*) FROM events WHERE task_id = :id", task.id)
                    == 1
                )
    finally:
        await engine.dispose()


async def test_answers_together_log_what_each_alone_logs(
    postgres_database: str, tmp_path: Path
) -> None:
    """A move, a duplicate and a conflicting terminal answer, together and alone: the
    same task_transition, terminal_conflict and task_polled lines, one set per answer."""
    await _truncate(postgres_database)
    engine = create_engine(postgres_database)
    reconciler = _reconciler(engine, make_settings(postgres_database, tmp_path))

    async def lines(together: bool) -> list[tuple[str, str]]:
        claimed = await _claimed_tasks(engine, 3)
        (moving, a), (settled, b), (conflicting, c) = claimed
        async with engine.begin() as db:
            await db.execute(
                update(TASKS)
                .where(TASKS.c.id.in_([settled.id, conflicting.id]))
                .values(status="completed")
            )
        answers = [
            (a, Snapshot(TaskStatus.FAILED, upstream_id=moving.upstream_task_id)),
            (b, Snapshot(TaskStatus.COMPLETED, upstream_id=settled.upstream_task_id)),
            (c, Snapshot(TaskStatus.FAILED, upstream_id=conflicting.upstream_task_id)),
        ]
        names = {moving.id: "moving", settled.id: "settled", conflicting.id: "conflicting"}
        with capture_logs() as logs:
            if together:
                await reconciler._apply_answers(answers)
            else:
                for answer in answers:
                    await reconciler._apply_answers([answer], together=False)
        return sorted(
            (line["event"], names[line["task_id"]]) for line in logs if line.get("task_id") in names
        )

    try:
        alone = await lines(together=False)
        assert alone == sorted(
            [
                ("task_transition", "moving"),
                ("task_polled", "moving"),
                ("task_polled", "settled"),
                ("terminal_conflict", "conflicting"),
                ("task_polled", "conflicting"),
            ]
        )
        assert await lines(together=True) == alone
    finally:
        await engine.dispose()


async def test_a_mixed_batch_settles_every_lease_as_each_alone_does(
    postgres_database: str, tmp_path: Path
) -> None:
    """A move, an answer that leaves its task active, one about another provider task
    and one about a task already settled, in one batch next to the same answers alone:
    each task's status, lease, next poll, attempts and confirmation request agree."""
    await _truncate(postgres_database)
    engine = create_engine(postgres_database)
    reconciler = _reconciler(engine, make_settings(postgres_database, tmp_path))

    async def states(together: bool) -> list[tuple[Any, ...]]:
        claimed = await _claimed_tasks(engine, 4)
        async with engine.begin() as db:
            await db.execute(
                update(TASKS)
                .where(TASKS.c.id == claimed[3][0].id)
                # Settled by a callback meanwhile: its move ended the lease.
                .values(status="failed", poll_lease_until=None)
            )
        snapshots = [
            Snapshot(TaskStatus.CANCELLED, upstream_id=claimed[0][0].upstream_task_id),
            Snapshot(
                TaskStatus.PROCESSING, upstream_id=claimed[1][0].upstream_task_id, progress=40
            ),
            Snapshot(TaskStatus.COMPLETED, upstream_id="task-unified-someone-else"),
            Snapshot(TaskStatus.FAILED, upstream_id=claimed[3][0].upstream_task_id),
        ]
        answers = [
            (claim, snapshot) for (_, claim), snapshot in zip(claimed, snapshots, strict=True)
        ]
        if together:
            await reconciler._apply_answers(answers)
        else:
            for answer in answers:
                await reconciler._apply_answers([answer], together=False)
        found = []
        async with engine.connect() as db:
            for task, _ in claimed:
                row = (
                    await db.execute(
                        text(
                            "SELECT status, poll_lease_until IS NULL, next_poll_at IS NULL,"
                            " poll_attempts, confirm_requested_at IS NULL, progress"
                            " FROM tasks WHERE id = :id"
                        ),
                        {"id": task.id},
                    )
                ).one()
                found.append(tuple(row))
        return found

    try:
        alone = await states(together=False)
        assert [row[0] for row in alone] == ["cancelled", "processing", "processing", "failed"]
        assert all(row[1] for row in alone)  # no lease left out
        assert await states(together=True) == alone
    finally:
        await engine.dispose()
