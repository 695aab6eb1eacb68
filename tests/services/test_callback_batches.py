"""Terminal callbacks decided in batches (PostgreSQL): each as the single statement
decides it alone, one task once per batch, and a failed batch leaves no trace."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics, repository
from app.callback_urls import sign
from app.db import create_engine, create_session_factory
from app.errors import NotFound
from app.models import TaskStatus, utcnow
from app.repository import DELIVERIES, TASKS, OneStatement, TerminalCallback
from app.services import callback_batches, reconcile
from app.services.callback_batches import ConfirmationBatches
from app.services.callbacks import receive_in_batch
from app.upstream import parse_snapshot
from tests.api.test_webhooks import build_stack, hook
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body
from tests.postgres import dsn

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

STATES = [TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.COMPLETED, TaskStatus.FAILED]
CONFIRMATIONS = {
    "none": {},
    "waiting": {"confirm_requested_at": -2, "poll_claimed_at": -5},
    "waiting, poll out": {"confirm_requested_at": -5, "poll_claimed_at": -2},
}
PROVIDER_IDS = ["same", "none on the task", "another"]
WRITTEN = (TASKS.c.status, TASKS.c.confirm_requested_at, TASKS.c.next_poll_at)


class CountedBatches(ConfirmationBatches):
    """Batches that remember their sizes."""

    def __init__(self, engine: AsyncEngine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.sizes: list[int] = []

    async def _run(
        self, callbacks: list[TerminalCallback], now: datetime
    ) -> dict[str, OneStatement]:
        self.sizes.append(len(callbacks))
        return await super()._run(callbacks, now)


async def _twins(engine: AsyncEngine, now: datetime) -> list[tuple[Any, Any, TerminalCallback]]:
    """For every case, two identical tasks and the callback each gets (ids differ)."""
    cases = []
    async with create_session_factory(engine)() as session:
        for status in STATES:
            for name, offsets in CONFIRMATIONS.items():
                for provider_id in PROVIDER_IDS:
                    times = {k: now + timedelta(seconds=v) for k, v in offsets.items()}
                    pair = []
                    for _ in range(2):
                        named = f"task-unified-1-{secrets.token_hex(6)}"
                        carried = {"same": named, "none on the task": None}.get(
                            provider_id, f"task-unified-2-{secrets.token_hex(6)}"
                        )
                        task = await make_task(
                            session, status=status.value, upstream_task_id=carried, **times
                        )
                        pair.append((task, named))
                    (alone, named_alone), (batched, named_batched) = pair
                    reported = "failed" if name == "waiting" else "completed"
                    cases.append(
                        (
                            (alone, TerminalCallback(alone.id, named_alone, reported, "0" * 64)),
                            batched,
                            TerminalCallback(batched.id, named_batched, reported, "1" * 64),
                        )
                    )
    return cases


async def _written(engine: AsyncEngine, task_id: str) -> tuple[Any, list[str]]:
    async with engine.connect() as db:
        row = (await db.execute(select(*WRITTEN).where(TASKS.c.id == task_id))).one()
        outcomes = await db.execute(
            select(DELIVERIES.c.outcome).where(DELIVERIES.c.task_id == task_id)
        )
        return tuple(row), list(outcomes.scalars())


async def test_a_batch_decides_and_writes_each_callback_as_the_single_statement_does(
    postgres_database: str,
) -> None:
    """Every state, confirmation state and provider id in one batch, next to a twin
    task decided alone: the same outcome, the same columns, the same delivery row."""
    engine = create_engine(postgres_database)
    now = utcnow()
    batches = CountedBatches(engine, in_flight=1)
    try:
        cases = await _twins(engine, now)
        unknown = TerminalCallback("tsk_unknown" + secrets.token_hex(4), "task-x", "completed", "")
        batched = await asyncio.gather(
            *(batches.decide(callback) for _, _, callback in cases), batches.decide(unknown)
        )
        for (alone, alone_callback), _, _ in cases:
            async with engine.connect() as db:
                single = await repository.confirm_in_one_statement(
                    db,
                    task_id=alone.id,
                    upstream_id=alone_callback.upstream_id,
                    reported=alone_callback.reported,
                    body_sha256=alone_callback.body_sha256,
                    now=now,
                )
                await db.commit()
            assert single is not None
        checked = 0
        for ((alone, _), batched_task, _), result in zip(cases, batched[:-1], strict=True):
            single_written = await _written(engine, alone.id)
            batch_written = await _written(engine, batched_task.id)
            assert result is not None
            assert result.status == alone.status
            assert batch_written[1] == single_written[1]  # the delivery's outcome, or none
            assert (result.outcome is None) == (single_written[1] == [])
            # The columns: equal, up to the time each statement ran at.
            assert batch_written[0][0] == single_written[0][0]
            assert _changed(batch_written[0], batched_task) == _changed(single_written[0], alone)
            checked += 1
        assert checked == len(cases)
        assert batched[-1] == OneStatement(None, None)  # no such task
        assert batches.sizes == [len(cases) + 1]  # one statement for all of them
        decided = {r.outcome for r in batched if r is not None}
        assert decided == {"confirming", "duplicate", "anomaly", None}
    finally:
        await engine.dispose()


def _changed(written: tuple[Any, ...], task: Any) -> list[bool]:
    """Which of the request's time columns the statement wrote."""
    before = (task.confirm_requested_at, task.next_poll_at)
    return [now != then for now, then in zip(written[1:], before, strict=True)]


async def _completions(engine: AsyncEngine, count: int) -> list[TerminalCallback]:
    """Tasks in `processing`, and the terminal callback each gets."""
    callbacks = []
    async with create_session_factory(engine)() as session:
        for _ in range(count):
            task = await make_task(session, status="processing")
            assert task.upstream_task_id
            callbacks.append(TerminalCallback(task.id, task.upstream_task_id, "completed", ""))
    return callbacks


async def test_callbacks_about_one_task_are_decided_one_batch_after_another(
    postgres_database: str,
) -> None:
    """A statement can change a row once: a task's second and third deliveries wait for
    later batches, and are told they repeat the first."""
    engine = create_engine(postgres_database)
    batches = CountedBatches(engine, in_flight=1)
    try:
        same, another = await _completions(engine, 2)
        results = await asyncio.gather(
            batches.decide(same), batches.decide(same), batches.decide(another),
            batches.decide(same),
        )  # fmt: skip
        assert [r.outcome if r else None for r in results] == [
            "confirming",
            "duplicate",
            "confirming",
            "duplicate",
        ]
        assert batches.sizes == [2, 1, 1]
        assert (await _written(engine, same.task_id))[1] == [
            "confirming",
            "duplicate",
            "duplicate",
        ]
    finally:
        await engine.dispose()


async def test_a_failed_batch_writes_nothing_and_each_callback_takes_the_general_path(
    service_factory: Any, postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock (or a lost connection) fails the whole batch: nothing of it commits,
    its connection is not reused, and each callback is answered by the general path."""
    settings = make_settings(postgres_database, tmp_path)
    stack = await build_stack(service_factory, settings)
    task = await stack.submit()
    seen: list[Any] = []

    async def deadlocked(db: Any, callbacks: Any, now: datetime) -> Any:
        seen.append(await db.get_raw_connection())
        raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")

    monkeypatch.setattr(
        callback_batches, "repository", SimpleNamespace(confirm_in_batch=deadlocked)
    )
    body = dumps(task_body("completed", upstream_id=task["upstream_task_id"]))
    failed_before = metrics.CALLBACK_BATCHES_FAILED._value.get()
    with structlog.testing.capture_logs() as logged:
        response = await stack.service.client.post(hook(task["id"]), content=body)
        again = await stack.service.client.post(hook(task["id"]), content=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": True, "outcome": "confirming"}
    assert again.status_code == 200, again.text
    assert len(seen) == 2
    assert not seen[0].is_valid  # invalidated: never handed out again
    recorded = await stack.deliveries(task["id"])
    assert recorded[0] == ("confirming", False)
    assert len(recorded) == 2
    # Counted each time, said once a minute: a failing statement is seen, not flooded.
    assert metrics.CALLBACK_BATCHES_FAILED._value.get() == failed_before + 2
    warnings = [line for line in logged if line["event"] == "callback_batches_failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["error"] == "DeadlockDetectedError"


async def test_a_callback_whose_request_went_away_is_still_recorded(
    postgres_database: str,
) -> None:
    """The caller hanging up mid-batch cancels its wait, not the batch: the delivery
    is recorded and the others in the batch get their answers."""
    engine = create_engine(postgres_database)
    batches = CountedBatches(engine, in_flight=1)
    try:
        gone, kept = await _completions(engine, 2)
        hung_up = asyncio.ensure_future(batches.decide(gone))
        waiting = asyncio.ensure_future(batches.decide(kept))
        await asyncio.sleep(0)  # both queued, their batch started
        hung_up.cancel()
        result = await waiting
        assert result == OneStatement("confirming", "processing")
        await batches.aclose()
        assert hung_up.cancelled()
        assert (await _written(engine, gone.task_id))[1] == ["confirming"]
        assert batches.sizes == [2]
    finally:
        await engine.dispose()


async def test_a_forged_callback_never_reaches_a_batch(postgres_database: str) -> None:
    """A wrong token is refused before anything is queued: no round trip, no row."""
    engine = create_engine(postgres_database)
    batches = CountedBatches(engine)
    settings = make_settings(postgres_database, Path("."))
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(session, status="processing")
        body = dumps(task_body("completed", upstream_id=task.upstream_task_id))
        forged = sign(task.id, "another-secret-of-enough-length")
        with pytest.raises(NotFound):
            await receive_in_batch(batches, settings, task.id, forged, body)
        assert batches.sizes == []
        assert (await _written(engine, task.id))[1] == []
        real = await receive_in_batch(
            batches, settings, task.id, sign(task.id, WEBHOOK_SECRET), body
        )
        assert real is not None
        assert real.outcome.value == "confirming"
        assert batches.sizes == [1]
    finally:
        await engine.dispose()


async def _await_a_lock_wait(url: str) -> None:
    """Until some statement in the database waits for a row lock (bounded)."""
    admin = await asyncpg.connect(dsn(url))
    try:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        for _ in range(500):
            if await admin.fetchval(waiting):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no statement came to wait for a lock")
    finally:
        await admin.close()


async def test_a_poll_batch_and_a_callback_batch_on_the_same_tasks_do_not_deadlock(
    service_factory: Any, postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker applies answers about several tasks in one transaction while a callback
    batch locks the same rows: both take them in the same order, so one waits for the
    other instead of PostgreSQL killing one of them as a deadlock (a second later)."""
    stack = await build_stack(service_factory, make_settings(postgres_database, tmp_path))
    reconciler = stack.service.runtime.reconciler
    submitted = sorted([await stack.submit("a cat"), await stack.submit("a dog")], key=_id)
    claims = []
    async with stack.service.runtime.engine.begin() as db:
        for task in submitted:
            due = update(TASKS).where(TASKS.c.id == task["id"])
            await db.execute(due.values(next_poll_at=utcnow() - timedelta(minutes=1)))
            claim = await repository.claim_poll(
                db, task["id"], now=utcnow(), lease=timedelta(minutes=1), spacing=timedelta(0)
            )
            assert claim is not None
            claims.append(claim)
    # The answers in the order they arrived: the later id first.
    answers = [
        (claim, parse_snapshot(task_body("processing", upstream_id=claim.upstream_task_id)))
        for claim in reversed(claims)
    ]
    applied_one = asyncio.Event()
    real_apply = reconcile.apply_snapshot

    async def apply_then_let_the_batch_in(*args: Any, **kwargs: Any) -> Any:
        result = await real_apply(*args, **kwargs)
        if not applied_one.is_set():
            applied_one.set()  # one row locked in the worker's transaction
            await _await_a_lock_wait(postgres_database)  # the batch waits on a row
        return result

    monkeypatch.setattr(reconcile, "apply_snapshot", apply_then_let_the_batch_in)
    tries: list[int] = []
    real_apply_answers = reconciler._apply_answers

    async def counted(batch: Any) -> None:
        tries.append(len(batch))
        await real_apply_answers(batch)

    monkeypatch.setattr(reconciler, "_apply_answers", counted)
    batches = CountedBatches(stack.service.runtime.engine)
    worker = asyncio.ensure_future(reconciler._apply_answers(answers))
    await applied_one.wait()
    decided = await asyncio.gather(
        *(
            batches.decide(TerminalCallback(c.id, c.upstream_task_id or "", "completed", ""))
            for c in claims
        )
    )
    await worker
    assert batches.sizes == [2]
    assert decided == [OneStatement("confirming", "processing")] * 2  # not failed
    assert tries == [2]  # the worker's batch went through whole
    for task in submitted:
        assert (await _written(stack.service.runtime.engine, task["id"]))[1] == ["confirming"]


def _id(item: Any) -> str:
    return str(item["id"] if isinstance(item, dict) else item.id)


async def test_two_processes_batching_repeats_of_the_same_tasks_confirm_each_once(
    postgres_database: str,
) -> None:
    """Two replicas (two engines, two sets of batches) get every task's callback several
    times at once: no batch fails (rows are locked in one order), each task gets
    exactly one 'confirming' and every delivery is recorded."""
    engines = [create_engine(postgres_database) for _ in range(2)]
    replicas = [CountedBatches(engine, max_batch=8) for engine in engines]
    try:
        async with create_session_factory(engines[0])() as session:
            tasks = [await make_task(session, status="processing") for _ in range(24)]
        callbacks = [
            TerminalCallback(t.id, t.upstream_task_id or "", "completed", "0" * 64) for t in tasks
        ]
        repeats = 4
        deliveries = [
            (replicas[(n + k) % 2], callback)
            for k in range(repeats)
            for n, callback in enumerate(callbacks)
        ]
        results = await asyncio.gather(*(batches.decide(cb) for batches, cb in deliveries))
        assert None not in results  # no batch failed
        assert sum(len(r.sizes) for r in replicas) > 2  # several batches, on both
        by_task: dict[str, list[str | None]] = {}
        for (_, callback), result in zip(deliveries, results, strict=True):
            assert result is not None
            by_task.setdefault(callback.task_id, []).append(result.outcome)
        for task in tasks:
            outcomes = by_task[task.id]
            assert sorted(o or "" for o in outcomes) == ["confirming"] + ["duplicate"] * (
                repeats - 1
            )
            assert sorted((await _written(engines[0], task.id))[1]) == sorted(
                o or "" for o in outcomes
            )
    finally:
        for engine in engines:
            await engine.dispose()


async def test_closing_waits_for_the_batch_out_and_its_callbacks_get_their_answers(
    postgres_database: str,
) -> None:
    """Shutdown while a batch waits on a row lock: closing waits for it (not for ever:
    the lock's holder ends), the callback gets its answer, and the queue is empty."""
    engine = create_engine(postgres_database)
    batches = CountedBatches(engine)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(session, status="processing")
        assert task.upstream_task_id
        async with engine.connect() as holder:
            await holder.execute(select(TASKS.c.id).where(TASKS.c.id == task.id).with_for_update())
            answer = asyncio.ensure_future(
                batches.decide(TerminalCallback(task.id, task.upstream_task_id, "completed", ""))
            )
            await _await_a_lock_wait(postgres_database)
            closing = asyncio.ensure_future(batches.aclose())
            await asyncio.sleep(0)
            assert not closing.done()  # the batch is still out
            await holder.rollback()
        await closing
        assert await answer == OneStatement("confirming", "processing")
        assert batches.queued == 0
        assert not batches._drainers
    finally:
        await engine.dispose()
