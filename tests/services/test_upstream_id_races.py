"""Two tasks given the same provider id at the same moment.

Sequentially the second is refused by `owns_upstream_id`: a mismatch. When another
task's write of the id is still uncommitted, the guard cannot see it, and the
second write meets the unique index instead. It must end exactly as the
sequential case ends: the same outcome, the task unchanged, never an error.

On PostgreSQL the other write holds its transaction open until ours waits on it;
SQLite's immediate transactions serialize the two (ours waits for the write lock),
so there the race is the sequential case by construction.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository
from app.callback_urls import sign
from app.config import Settings
from app.db import create_engine, create_session_factory, statement_commits
from app.errors import Unprocessable
from app.models import TaskStatus, utcnow
from app.schemas import Snapshot, TaskCreate
from app.services import callbacks
from app.services.callback_batches import ConfirmationBatches
from app.services.snapshots import Outcome, apply_snapshot
from app.services.tasks import SubmitResult, submit_task
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")

T = TypeVar("T")


@pytest.fixture
def taken() -> str:
    """The provider id both tasks are given: a new one per test (the PostgreSQL
    database is shared by a run's tests, and a failed test may leave its rows)."""
    return f"task-unified-1757156493-{secrets.token_hex(4)}"


@pytest_asyncio.fixture(loop_scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    built = create_engine(database_url)
    yield built
    await built.dispose()


async def _waits_on_a_lock(engine: AsyncEngine) -> None:
    """Until some statement waits on a lock (PostgreSQL); a moment on SQLite, whose
    waits do not show (and whose outcome does not depend on the timing)."""
    if engine.dialect.name != "postgresql":
        await asyncio.sleep(0.2)
        return
    for _ in range(250):
        async with engine.connect() as probe:
            waiting = await probe.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            )
            if waiting.scalar_one():
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the write never waited on the other task's")


async def while_another_task_takes_the_id(
    engine: AsyncEngine, upstream_id: str, operation: Callable[[], Awaitable[T]]
) -> T:
    """Run `operation` while another task adopts `upstream_id` through the state machine in a
    transaction left open until the operation waits on it; then that one commits."""
    async with create_session_factory(engine)() as session:
        other = await make_task(session, status="submitting", upstream_task_id=None)
    async with engine.connect() as holder:
        adopted = await apply_snapshot(
            holder,
            other.id,
            Snapshot(TaskStatus.PENDING, upstream_id),
            now=utcnow(),
            poll_after=timedelta(seconds=60),
        )
        assert adopted.outcome is Outcome.APPLIED
        running = asyncio.ensure_future(operation())
        try:
            await _waits_on_a_lock(engine)
        finally:
            await holder.commit()
    return await running


async def _rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as db:
        return list((await db.execute(text(sql), params)).all())


class Provider:
    """Answers every submission with the same snapshot."""

    def __init__(self, answer: Snapshot) -> None:
        self.answer = answer

    async def submit(self, body: dict[str, Any]) -> Snapshot:
        return self.answer


async def _submit(engine: AsyncEngine, settings: Settings, answer: Snapshot) -> SubmitResult:
    request = TaskCreate.model_validate({"prompt": "a lighthouse", "size": "1:1"})
    factory = create_session_factory(engine)
    return await submit_task(
        engine, factory, Provider(answer), settings, request, owner="tests", idempotency_key=None
    )  # type: ignore[arg-type]


ANSWERS = {
    "pending (the prepared statement)": {"status": TaskStatus.PENDING, "estimated_time": 30},
    "processing (the state machine)": {"status": TaskStatus.PROCESSING, "progress": 10},
}


@pytest.mark.parametrize("fields", ANSWERS.values(), ids=ANSWERS.keys())
async def test_a_submit_answer_naming_an_id_another_task_is_taking_is_a_mismatch(
    engine: AsyncEngine, settings: Settings, taken: str, fields: dict[str, Any]
) -> None:
    """As when the other task had it first: the outcome is a mismatch, the task stays
    submitting without a provider id (the reconciler settles it), its answer noted."""
    answer = Snapshot(upstream_id=taken, **fields)
    result = await while_another_task_takes_the_id(
        engine, taken, lambda: _submit(engine, settings, answer)
    )
    assert result.log_fields["outcome"] == Outcome.MISMATCH.value
    assert (result.task.status, result.task.upstream_task_id) == ("submitting", None)
    stored = await _rows(
        engine, "SELECT status, upstream_task_id FROM tasks WHERE id = :t", t=result.task.id
    )
    assert [tuple(row) for row in stored] == [("submitting", None)]
    notes = await _rows(
        engine, "SELECT outcome FROM task_activity WHERE task_id = :t", t=result.task.id
    )
    assert [row.outcome for row in notes] == ["accepted"]
    owners = await _rows(engine, "SELECT id FROM tasks WHERE upstream_task_id = :u", u=taken)
    assert len(owners) == 1
    assert owners[0].id != result.task.id


CALLBACKS = {
    "processing": (False, "processing"),
    "completed, confirmed": (True, "completed"),
    "completed, applied": (False, "completed"),
}


@pytest.mark.parametrize("one_statement", [True, False], ids=["one statement", "after a batch"])
@pytest.mark.parametrize("case", CALLBACKS.values(), ids=CALLBACKS.keys())
async def test_a_callback_naming_an_id_another_task_is_taking_is_refused(
    engine: AsyncEngine,
    database_url: str,
    tmp_path: Path,
    taken: str,
    case: tuple[bool, str],
    one_statement: bool,
) -> None:
    """A task whose submit answer was lost learns its provider id from a callback;
    if another task is taking that id at the same moment, the callback is refused
    as a mismatch (422), nothing recorded, the task unchanged."""
    confirm, reported = case
    settings = make_settings(database_url, tmp_path, confirm_callbacks=confirm)
    async with create_session_factory(engine)() as session:
        task = await make_task(session, status="submitting", upstream_task_id=None)
    body = dumps(task_body(reported, upstream_id=taken))

    async def deliver() -> Any:
        async with statement_commits(engine) as db:
            return await callbacks.receive_callback(
                db,
                settings,
                task.id,
                sign(task.id, WEBHOOK_SECRET),
                body,
                one_statement=one_statement,
            )

    with pytest.raises(Unprocessable) as refused:
        await while_another_task_takes_the_id(engine, taken, deliver)
    assert refused.value.code == "task_mismatch"
    stored = await _rows(
        engine,
        "SELECT status, upstream_task_id, confirm_requested_at FROM tasks WHERE id = :t",
        t=task.id,
    )
    assert [tuple(row) for row in stored] == [("submitting", None, None)]
    deliveries = await _rows(
        engine, "SELECT 1 FROM callback_deliveries WHERE task_id = :t", t=task.id
    )
    assert deliveries == []


@pytest.mark.postgres
async def test_a_batched_callback_naming_an_id_another_task_is_taking_is_refused(
    postgres_database: str, tmp_path: Path, taken: str
) -> None:
    """The webhook's own sequence on PostgreSQL: the batch statement leaves a task
    without a provider id to the general path, which refuses the taken id."""
    settings = make_settings(postgres_database, tmp_path, confirm_callbacks=True)
    engine = create_engine(postgres_database)
    batches = ConfirmationBatches(engine)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(session, status="submitting", upstream_task_id=None)
        token = sign(task.id, WEBHOOK_SECRET)
        body = dumps(task_body("completed", upstream_id=taken))

        async def deliver() -> Any:
            received = await callbacks.receive_in_batch(batches, settings, task.id, token, body)
            assert received is None  # the batch statement decides nothing for it
            async with statement_commits(engine) as db:
                return await callbacks.receive_callback(
                    db, settings, task.id, token, body, one_statement=False
                )

        with pytest.raises(Unprocessable):
            await while_another_task_takes_the_id(engine, taken, deliver)
        stored = await _rows(engine, "SELECT upstream_task_id FROM tasks WHERE id = :t", t=task.id)
        assert [row.upstream_task_id for row in stored] == [None]
    finally:
        await batches.aclose()
        await engine.dispose()


class GatedProvider:
    """Answers each submission with the same provider id, once all `expected` have
    asked: the answers arrive together."""

    def __init__(self, answer: Snapshot, expected: int) -> None:
        self.answer = answer
        self.expected = expected
        self.asked = 0
        self.all_asked = asyncio.Event()

    async def submit(self, body: dict[str, Any]) -> Snapshot:
        self.asked += 1
        if self.asked == self.expected:
            self.all_asked.set()
        await self.all_asked.wait()
        return self.answer


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.PROCESSING])
async def test_concurrent_submissions_answered_with_one_id_give_it_to_one_task(
    engine: AsyncEngine, settings: Settings, taken: str, status: TaskStatus
) -> None:
    """Several submissions whose answers all name the same provider task, at once:
    one task carries it, every other is a mismatch left submitting, none fails."""
    submissions = 4
    provider = GatedProvider(Snapshot(status, taken), submissions)
    request = TaskCreate.model_validate({"prompt": "a lighthouse", "size": "1:1"})
    factory = create_session_factory(engine)
    results = await asyncio.gather(
        *(
            submit_task(
                engine, factory, provider, settings, request, owner="tests", idempotency_key=None
            )  # type: ignore[arg-type]
            for _ in range(submissions)
        )
    )
    outcomes = sorted(result.log_fields["outcome"] for result in results)
    assert outcomes == ["applied"] + ["mismatch"] * (submissions - 1)
    carriers = [result.task.id for result in results if result.task.upstream_task_id == taken]
    stored = await _rows(engine, "SELECT id FROM tasks WHERE upstream_task_id = :u", u=taken)
    assert [row.id for row in stored] == carriers
    statuses = sorted(result.task.status for result in results)
    assert statuses == sorted([status.value] + ["submitting"] * (submissions - 1))


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.PROCESSING])
async def test_a_snapshot_decided_on_a_state_read_before_the_task_took_its_id_is_refused(
    engine: AsyncEngine, taken: str, status: TaskStatus
) -> None:
    """The webhook reads a task's state before its transaction; if the task's own
    submit answer gives it an id in between, a snapshot naming another id must not
    move it (it describes a provider task that is not this one's)."""
    async with create_session_factory(engine)() as session:
        task = await make_task(session, status="submitting", upstream_task_id=None)
    async with engine.connect() as db:
        read_before = await repository.task_state(db, task.id)
    assert read_before is not None
    assert read_before.upstream_task_id is None
    async with engine.begin() as db:  # the submit answer, committed meanwhile
        await db.execute(
            text("UPDATE tasks SET upstream_task_id = :id WHERE id = :task"),
            {"id": taken, "task": task.id},
        )
    other = f"task-unified-1757156493-{secrets.token_hex(4)}"
    async with engine.begin() as db:
        applied = await apply_snapshot(
            db,
            task.id,
            Snapshot(status, other, progress=60),
            now=utcnow(),
            poll_after=timedelta(seconds=60),
            state=read_before,
        )
    assert applied.outcome is Outcome.MISMATCH
    rows = await _rows(
        engine, "SELECT status, progress, upstream_task_id FROM tasks WHERE id = :id", id=task.id
    )
    assert rows == [("submitting", 0, taken)]
