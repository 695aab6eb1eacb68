"""The state machine over every pair of states, on both databases."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import repository
from app.db import create_engine, create_session_factory, statement_commits, transaction
from app.models import TaskStatus, utcnow
from app.repository import DELIVERIES, TASKS
from app.schemas import Snapshot, SnapshotImage
from app.services import callbacks
from app.services.snapshots import Outcome, apply_snapshot, classify, transition
from tests.factories import make_task
from tests.services.test_callback_races import (
    PATHS,
    Webhook,
    delivered,
    request_columns,
    while_a_poll_writes,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

ACTIVE = [TaskStatus.SUBMITTING, TaskStatus.PENDING, TaskStatus.PROCESSING]
TERMINAL = [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED]
REPORTABLE = [s for s in TaskStatus if s is not TaskStatus.SUBMITTING]
POLL_AFTER = timedelta(seconds=120)


@pytest_asyncio.fixture(loop_scope="session")
async def session(database_url: str) -> AsyncIterator[AsyncSession]:
    """A session on a freshly migrated database."""
    engine = create_engine(database_url)
    async with create_session_factory(engine)() as session:
        yield session
    await engine.dispose()


def expected(current: TaskStatus, reported: TaskStatus) -> Outcome:
    """What DESIGN says should happen (progress equal on both sides)."""
    if current.terminal:
        if reported is current:
            return Outcome.DUPLICATE
        return Outcome.ANOMALY if reported.terminal else Outcome.STALE
    if reported.terminal or reported.rank > current.rank:
        return Outcome.APPLIED
    return Outcome.DUPLICATE if reported is current else Outcome.STALE


@pytest.mark.parametrize(
    ("current", "reported"), list(itertools.product(ACTIVE + TERMINAL, REPORTABLE))
)
async def test_every_pair_of_states(
    session: AsyncSession, current: TaskStatus, reported: TaskStatus
) -> None:
    """Forward moves apply; same news is a duplicate; backward is stale; terminal is final."""
    task = await make_task(session, status=current.value, progress=10)
    snapshot = Snapshot(
        status=reported,
        upstream_id=task.upstream_task_id,
        progress=10,
        images=(SnapshotImage("https://cdn.example.com/a.png"),)
        if reported is TaskStatus.COMPLETED
        else (),
        error_code="boom" if reported is TaskStatus.FAILED else None,
        error_message="it broke" if reported is TaskStatus.FAILED else None,
    )
    result = await apply_snapshot(
        await session.connection(), task.id, snapshot, now=utcnow(), poll_after=POLL_AFTER
    )
    await session.commit()
    want = expected(current, reported)
    assert result.outcome is want
    stored = await repository.get_task(session, task.id)
    assert stored is not None
    assert stored.status == (reported if want is Outcome.APPLIED else current).value
    images = (await repository.task_images(session, [task.id]))[task.id]
    if want is Outcome.APPLIED and reported is TaskStatus.COMPLETED:
        assert stored.image_status == "pending"
        assert [image.source_url for image in images] == ["https://cdn.example.com/a.png"]
        assert stored.next_poll_at is None
    else:
        assert images == []
    if want is Outcome.APPLIED and reported is TaskStatus.FAILED:
        assert (stored.error_code, stored.error_message) == ("boom", "it broke")
    if want is not Outcome.APPLIED:
        assert stored.image_status is None


async def test_progress_only_grows_within_a_state(session: AsyncSession) -> None:
    """Higher progress applies; equal or lower progress changes nothing."""
    task = await make_task(session, status="processing", progress=40)
    now = utcnow()

    async def report(progress: int) -> Outcome:
        snapshot = Snapshot(status=TaskStatus.PROCESSING, progress=progress)
        result = await apply_snapshot(
            await session.connection(), task.id, snapshot, now=now, poll_after=POLL_AFTER
        )
        await session.commit()
        return result.outcome

    assert await report(60) is Outcome.APPLIED
    assert await report(60) is Outcome.DUPLICATE
    assert await report(20) is Outcome.DUPLICATE
    stored = await repository.get_task(session, task.id)
    assert stored is not None
    assert stored.progress == 60


async def test_a_snapshot_about_another_provider_task_changes_nothing(
    session: AsyncSession,
) -> None:
    """A foreign provider id is a mismatch, whatever it reports."""
    task = await make_task(session, status="pending")
    foreign = Snapshot(status=TaskStatus.COMPLETED, upstream_id="task-unified-1-someoneelse")
    result = await apply_snapshot(
        await session.connection(), task.id, foreign, now=utcnow(), poll_after=POLL_AFTER
    )
    await session.commit()
    assert result.outcome is Outcome.MISMATCH
    stored = await repository.get_task(session, task.id)
    assert stored is not None
    assert stored.status == "pending"


async def test_a_task_without_provider_id_adopts_it_unless_another_task_owns_it(
    session: AsyncSession,
) -> None:
    """A lost submit answer is repaired by the first snapshot that names the id."""
    other = await make_task(session, status="pending")
    task = await make_task(session, status="submitting", upstream_task_id=None)
    taken = Snapshot(status=TaskStatus.PROCESSING, upstream_id=other.upstream_task_id)
    result = await apply_snapshot(
        await session.connection(), task.id, taken, now=utcnow(), poll_after=POLL_AFTER
    )
    assert result.outcome is Outcome.MISMATCH
    fresh = Snapshot(status=TaskStatus.PROCESSING, upstream_id="task-unified-2-fresh", progress=5)
    result = await apply_snapshot(
        await session.connection(), task.id, fresh, now=utcnow(), poll_after=POLL_AFTER
    )
    await session.commit()
    assert result.outcome is Outcome.APPLIED
    assert result.state.upstream_task_id == "task-unified-2-fresh"


@pytest.mark.parametrize(
    ("current", "reported"), list(itertools.product(ACTIVE + TERMINAL, REPORTABLE))
)
@pytest.mark.parametrize("progress", [0, 10, 50])
async def test_the_sql_guard_agrees_with_the_rules(
    session: AsyncSession, current: TaskStatus, reported: TaskStatus, progress: int
) -> None:
    """The conditional UPDATE (what holds under races) matches `classify` exactly."""
    task = await make_task(session, status=current.value, progress=10)
    snapshot = Snapshot(status=reported, progress=progress)
    state = repository.TaskState(task.id, current, 10, task.upstream_task_id)
    condition, values = transition(snapshot, now=utcnow(), poll_after=POLL_AFTER)
    connection = await session.connection()
    changed = await repository.update_where(connection, task.id, condition, values)
    await session.rollback()
    assert changed == (classify(state, snapshot) is Outcome.APPLIED)


@pytest.mark.parametrize(
    ("current", "reported"), list(itertools.product(ACTIVE + TERMINAL, REPORTABLE))
)
@pytest.mark.parametrize("progress", [0, 10, 50])
async def test_the_webhooks_connection_agrees_with_the_rules(
    session: AsyncSession,
    database_url: str,
    current: TaskStatus,
    reported: TaskStatus,
    progress: int,
) -> None:
    """The webhook's path (statements that commit alone, then a transaction for a move)
    decides as `classify` does, and a won move is committed whole."""
    task = await make_task(session, status=current.value, progress=10)
    snapshot = Snapshot(status=reported, upstream_id=task.upstream_task_id, progress=progress)
    engine = create_engine(database_url)
    try:
        async with statement_commits(engine) as db:
            state = await repository.task_state(db, task.id)
            assert state is not None
            async with transaction(db):
                applied = await apply_snapshot(
                    db, task.id, snapshot, now=utcnow(), poll_after=POLL_AFTER, state=state
                )
            await db.commit()
    finally:
        await engine.dispose()
    assert (applied.outcome is Outcome.APPLIED) == (classify(state, snapshot) is Outcome.APPLIED)
    stored = await repository.get_task(session, task.id)
    assert stored is not None
    moved = applied.outcome is Outcome.APPLIED
    assert stored.status == (reported if moved else current).value
    events = await session.execute(
        text("SELECT count(*) FROM events WHERE task_id = :id"), {"id": task.id}
    )
    # A terminal move always tells; a move to processing tells (first of its kind).
    assert events.scalar_one() == (1 if moved and reported.rank >= 2 else 0)


async def test_a_failed_transaction_on_the_webhooks_connection_leaves_nothing(
    session: AsyncSession, database_url: str
) -> None:
    """Statements that must commit together roll back together, even where others autocommit."""
    task = await make_task(session, status="pending", progress=0)
    snapshot = Snapshot(status=TaskStatus.COMPLETED, upstream_id=task.upstream_task_id)
    engine = create_engine(database_url)
    outcomes: list[Outcome] = []

    async def request() -> None:
        async with statement_commits(engine) as db:
            assert await repository.task_state(db, task.id) is not None  # commits alone
            async with transaction(db):
                applied = await apply_snapshot(
                    db, task.id, snapshot, now=utcnow(), poll_after=POLL_AFTER
                )
                outcomes.append(applied.outcome)
                raise RuntimeError("the delivery could not be recorded")

    try:
        with pytest.raises(RuntimeError):
            await request()
        assert outcomes == [Outcome.APPLIED]
        # The pooled connection comes back clean: the next request reads and writes.
        async with statement_commits(engine) as db:
            assert await repository.task_state(db, task.id) is not None
    finally:
        await engine.dispose()
    stored = await repository.get_task(session, task.id)
    assert stored is not None
    assert (stored.status, stored.image_status) == ("pending", None)
    images = (await repository.task_images(session, [task.id]))[task.id]
    assert images == []


# The columns a terminal callback's confirmation request may write.
WRITTEN = (
    TASKS.c.status,
    TASKS.c.confirm_requested_at,
    TASKS.c.next_poll_at,
    TASKS.c.last_event_at,
)
CONFIRMATION_STATES = {
    "none": {},
    "waiting": {"confirm_requested_at": -2, "poll_claimed_at": -5},
    "waiting, poll out": {"confirm_requested_at": -5, "poll_claimed_at": -2},
}


@pytest.mark.postgres
@pytest.mark.parametrize("current", ACTIVE + TERMINAL)
@pytest.mark.parametrize("reported", TERMINAL)
@pytest.mark.parametrize("confirmation", list(CONFIRMATION_STATES))
@pytest.mark.parametrize("provider_id", ["same", "none on the task", "another"])
async def test_the_one_statement_confirmation_agrees_with_the_general_path(
    postgres_database: str,
    current: TaskStatus,
    reported: TaskStatus,
    confirmation: str,
    provider_id: str,
) -> None:
    """PostgreSQL's single statement for a terminal callback decides and writes exactly as
    the general path (`_queue_confirmation`) on a twin task, or leaves the case to it."""
    engine = create_engine(postgres_database)
    now = utcnow()
    times = {k: now + timedelta(seconds=v) for k, v in CONFIRMATION_STATES[confirmation].items()}

    def twin() -> tuple[dict[str, Any], str]:
        """A task's columns and the provider id its callback names (ids are unique)."""
        named = f"task-unified-1-{secrets.token_hex(6)}"
        carried = {"same": named, "none on the task": None}.get(
            provider_id, f"task-unified-2-{secrets.token_hex(6)}"
        )
        fields = {"status": current.value, "upstream_task_id": carried, **times}
        return {**fields, "next_poll_at": now + POLL_AFTER}, named

    general_fields, general_named = twin()
    fast_fields, fast_named = twin()
    try:
        async with create_session_factory(engine)() as session:
            general_task = await make_task(session, **general_fields)
            fast_task = await make_task(session, **fast_fields)
        async with statement_commits(engine) as db:
            state = await repository.task_state(db, general_task.id)
            assert state is not None
            snapshot = Snapshot(status=reported, upstream_id=general_named)
            general = await callbacks._queue_confirmation(db, state, snapshot, now)
            fast = await repository.confirm_in_one_statement(
                db,
                task_id=fast_task.id,
                upstream_id=fast_named,
                reported=reported.value,
                body_sha256="0" * 64,
                now=now,
            )
            rows = {}
            for task in (general_task, fast_task):
                found = await db.execute(select(*WRITTEN).where(TASKS.c.id == task.id))
                rows[task.id] = tuple(found.one())
            delivered = await db.execute(
                select(DELIVERIES.c.outcome).where(DELIVERIES.c.task_id == fast_task.id)
            )
            outcomes = list(delivered.scalars())
    finally:
        await engine.dispose()
    assert fast.status == current.value
    general_row, fast_row = rows[general_task.id], rows[fast_task.id]
    if fast.outcome is None:
        # Left to the general path, untouched: only a task without the callback's id.
        assert provider_id != "same"
        assert outcomes == []
        before = (fast_task.confirm_requested_at, fast_task.next_poll_at, fast_task.last_event_at)
        assert fast_row[1:] == before
        return
    assert provider_id == "same"
    assert Outcome(fast.outcome) is general
    assert outcomes == [general.value]
    assert fast_row == general_row  # status and the confirmation request's columns


@pytest.mark.postgres
@pytest.mark.parametrize("after", ACTIVE + TERMINAL)
@pytest.mark.parametrize("reported", TERMINAL)
async def test_the_one_statement_confirmation_agrees_with_the_general_path_in_a_race(
    postgres_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    after: TaskStatus,
    reported: TaskStatus,
) -> None:
    """A poll answering the waiting request and moving the task to `after` commits while
    both paths wait on its row: both decide on the row as it left it, as the rules say."""
    engine = create_engine(postgres_database)
    webhook = Webhook(postgres_database, engine, tmp_path, monkeypatch)
    now = utcnow()
    try:
        async with create_session_factory(engine)() as session:
            tasks = [
                await make_task(
                    session,
                    status="processing",
                    confirm_requested_at=now - timedelta(seconds=5),
                    poll_claimed_at=now - timedelta(seconds=2),
                    poll_lease_until=now + timedelta(seconds=60),
                )
                for _ in PATHS
            ]

        async def answer(poll: Any) -> None:
            for task in tasks:
                values = {"id": task.id, "status": after.value, "later": now + POLL_AFTER}
                await poll.execute(
                    text(
                        "UPDATE tasks SET status = :status, confirm_requested_at = NULL,"
                        " next_poll_at = :later, poll_lease_until = NULL WHERE id = :id"
                    ),
                    values,
                )

        pairs = zip(tasks, PATHS, strict=True)
        calls = [webhook.call(task, reported.value, path) for task, path in pairs]
        outcomes = await while_a_poll_writes(engine, answer, calls)
        recorded = [await delivered(engine, task.id) for task in tasks]
        rows = [await request_columns(engine, task.id) for task in tasks]
    finally:
        await engine.dispose()
    if after.terminal:
        state = repository.TaskState(tasks[0].id, after, 100, tasks[0].upstream_task_id)
        expected = classify(state, Snapshot(status=reported)).value
    else:
        expected = Outcome.CONFIRMING.value
    assert outcomes == [expected, expected]
    assert recorded == [[expected], [expected]]
    requested = [row.confirm_requested_at is not None for row in rows]
    assert requested == [not after.terminal] * 2
    assert all(row.next_poll_at == row.confirm_requested_at for row in rows if not after.terminal)
