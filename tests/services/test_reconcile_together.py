"""PostgreSQL: the provider's answers to a batch of confirmation queries, applied
together, write exactly what the state machine writes for each answer alone."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine, create_session_factory
from app.models import utcnow
from app.repository import TASKS, PollClaim
from app.services import reconcile
from app.upstream import parse_snapshot
from tests.conftest import make_settings
from tests.helpers import offline_reconciler
from tests.services.test_snapshot_batches import (
    _same_shape,
    _twins,
    subscribe_to_every_event,
    written_rows,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]


async def _written(engine: AsyncEngine, case: dict[str, Any]) -> dict[str, Any]:
    """Every row an answer may have written about this task, comparable across twins."""
    written = await written_rows(
        engine,
        case["task"].id,
        activity="SELECT kind, outcome, detail, at FROM task_activity WHERE task_id = :id",
    )
    activity = written["activity"]
    assert len(activity) == 1, activity  # one answered query
    return dict(_same_shape(written, case, activity[0]["at"]))


async def _claimed(engine: AsyncEngine, case: dict[str, Any], at: datetime) -> PollClaim:
    """The task as the worker's confirmation loop leases it."""
    task = case["task"]
    async with engine.begin() as db:
        await db.execute(
            update(TASKS)
            .where(TASKS.c.id == task.id)
            .values(poll_claimed_at=at, poll_lease_until=at + timedelta(seconds=10))
        )
    return PollClaim(task.id, task.upstream_task_id, task.created_at, 0, at, at)


async def test_answers_applied_together_write_what_each_alone_writes(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every state, reported terminal status and provider id: one batch of answers,
    next to a twin answer applied alone through the state machine; the same task row,
    images, event, outbox rows and timeline row. Only the usual answers (about the
    provider task the task carries) skip the one-by-one path."""
    engine = create_engine(postgres_database)
    settings = make_settings(postgres_database, tmp_path)
    start = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    reconciler = offline_reconciler(create_session_factory(engine), settings)
    # A task left active gets its next poll after a jittered backoff: the same for both.
    monkeypatch.setattr(reconcile.random, "uniform", lambda low, high: 1.0)
    try:
        await subscribe_to_every_event(engine, start)
        cases = await _twins(engine, start)
        answers: list[tuple[PollClaim, Any]] = []
        sessions = create_session_factory(engine)
        for alone, twin in cases:
            claim = await _claimed(engine, alone, start)
            async with sessions() as session, session.begin():
                snapshot = parse_snapshot(json.loads(alone["body"]))
                await reconciler._apply_one(await session.connection(), claim, snapshot, utcnow())
            answer = parse_snapshot(json.loads(twin["body"]))
            answers.append((await _claimed(engine, twin, start), answer))
        one_by_one: list[str] = []
        real_apply_one = reconciler._apply_one

        async def counted(db: Any, task: PollClaim, *args: Any) -> Any:
            one_by_one.append(task.id)
            return await real_apply_one(db, task, *args)

        monkeypatch.setattr(reconciler, "_apply_one", counted)
        await reconciler._apply_answers(answers)
        for alone, twin in cases:
            expected, written = await _written(engine, alone), await _written(engine, twin)
            for table, rows in expected.items():
                assert written[table] == rows, (table, alone["task"].status)
        usual = {
            twin["task"].id
            for _, twin in cases
            if twin["task"].upstream_task_id == twin["upstream_id"]
        }
        assert usual
        assert not usual & set(one_by_one)
        assert len(one_by_one) == len(cases) - len(usual)
    finally:
        await engine.dispose()


async def test_a_failing_batch_of_answers_falls_back_to_each_alone(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's statements fail: nothing of it stays, and every answer is applied
    alone instead."""
    engine = create_engine(postgres_database)
    settings = make_settings(postgres_database, tmp_path)
    start = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    reconciler = offline_reconciler(create_session_factory(engine), settings)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the batch cannot be written")

    try:
        cases = await _twins(engine, start)
        usual = [twin for _, twin in cases if twin["task"].upstream_task_id == twin["upstream_id"]]
        answers = [
            (await _claimed(engine, case, start), parse_snapshot(json.loads(case["body"])))
            for case in usual
        ]
        monkeypatch.setattr(reconcile.snapshot_batches, "apply_snapshots", broken)
        await reconciler._apply_answers(answers)
        async with engine.connect() as db:
            rows = await db.execute(
                select(TASKS.c.status).where(TASKS.c.id.in_([c["task"].id for c in usual]))
            )
            statuses = [status for (status,) in rows]
        # Each active task moved to its reported terminal status, alone.
        assert {"completed", "failed", "cancelled"} <= set(statuses)
        for case in usual:
            await _written(engine, case)  # one timeline row each, not two
    finally:
        await engine.dispose()
