"""Submission: the task, its key and its task.created event recorded together, and
the provider's usual answer applied by a statement built from the state machine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import and_, bindparam, insert, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository
from app.config import Settings
from app.db import create_engine, create_session_factory, metadata
from app.errors import Conflict, Unprocessable
from app.models import TaskStatus
from app.repository import TASKS, owns_upstream_id_sql
from app.schemas import Snapshot, TaskCreate
from app.services import submit_answer
from app.services.snapshots import apply_snapshot, transition
from app.services.tasks import submit_task

ASYNC = pytest.mark.asyncio(loop_scope="session")

NOW = datetime(2026, 11, 29, 20, 0, 1, 123456, tzinfo=UTC)
POLL_AFTER = timedelta(seconds=37)
ANSWERS = [
    Snapshot(status=TaskStatus.PENDING, upstream_id="up_1"),
    Snapshot(status=TaskStatus.PENDING, upstream_id="up_1", progress=5, estimated_time=30),
    Snapshot(status=TaskStatus.PENDING, upstream_id="up_1", can_cancel=False),
    Snapshot(status=TaskStatus.PENDING, upstream_id="up_1", can_cancel=True, usage={"n": 1}),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_the_prepared_answer_is_the_state_machines_own_update(answer: Snapshot) -> None:
    """Same SQL, same values, as `transition` and `owns_upstream_id` give this answer."""
    condition, values = transition(answer, now=NOW, poll_after=POLL_AFTER)
    guard = and_(condition, owns_upstream_id_sql("tsk_1", "up_1"))
    direct = update(TASKS).where(TASKS.c.id == "tsk_1", guard).values(**values)
    shape = submit_answer.Shape.of(answer)
    guard, values = submit_answer.template(shape)
    task_id = bindparam("task_id", type_=TASKS.c.id.type)
    prepared = update(TASKS).where(TASKS.c.id == task_id, guard).values(**values)
    params = submit_answer.params("tsk_1", answer, now=NOW, poll_after=POLL_AFTER)

    dialect = sqlite.dialect()  # positional: every use of a value is listed
    one, other = direct.compile(dialect=dialect), prepared.compile(dialect=dialect)
    assert str(other) == str(one)
    filled = other.construct_params(params)
    assert [filled[key] for key in other.positiontup or []] == [
        one.params[key] for key in one.positiontup or []
    ]


class Provider:
    """Answers the submit call with `answer`, after running `meanwhile` (a callback)."""

    def __init__(
        self, answer: Snapshot, meanwhile: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.answer = answer
        self.meanwhile = meanwhile
        self.bodies: list[dict[str, Any]] = []

    async def submit(self, body: dict[str, Any]) -> Snapshot:
        self.bodies.append(body)
        if self.meanwhile is not None:
            await self.meanwhile(body["callback_url"].split("/")[-2])
        return self.answer


@pytest_asyncio.fixture(loop_scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the parametrized, migrated database."""
    built = create_engine(settings.database_url)
    yield built
    await built.dispose()


async def _submit(
    engine: AsyncEngine, settings: Settings, provider: Provider, key: str | None = None
) -> Any:
    request = TaskCreate.model_validate({"prompt": "a lighthouse", "size": "1:1"})
    factory = create_session_factory(engine)
    return await submit_task(
        engine, factory, provider, settings, request, owner="tests", idempotency_key=key
    )  # type: ignore[arg-type]


async def _rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as db:
        return list((await db.execute(text(sql), params)).all())


@ASYNC
async def test_a_pending_answer_moves_the_task_and_notes_it_once(
    engine: AsyncEngine, settings: Settings
) -> None:
    """The task, one task.created event, the answer applied and one activity row."""
    answer = Snapshot(status=TaskStatus.PENDING, upstream_id="up_a", estimated_time=20)
    result = await _submit(engine, settings, Provider(answer), key="key-a")
    task = result.task
    assert (task.status, task.upstream_task_id, task.estimated_time) == ("pending", "up_a", 20)
    assert result.log_fields["outcome"] == "applied"
    assert result.log_fields["task_status"] == "pending"
    events = await _rows(engine, "SELECT type FROM events WHERE task_id = :t", t=task.id)
    assert [row.type for row in events] == ["task.created"]
    notes = await _rows(engine, "SELECT outcome FROM task_activity WHERE task_id = :t", t=task.id)
    assert [row.outcome for row in notes] == ["accepted"]
    keys = await _rows(engine, "SELECT task_id FROM idempotency_records WHERE key = 'key-a'")
    assert [row.task_id for row in keys] == [task.id]


@ASYNC
async def test_an_answer_after_a_callback_goes_through_the_state_machine(
    engine: AsyncEngine, settings: Settings
) -> None:
    """A callback that moved the task first wins; the late pending answer is stale."""

    async def callback(task_id: str) -> None:
        async with engine.begin() as db:
            processing = Snapshot(status=TaskStatus.PROCESSING, upstream_id="up_b", progress=40)
            await apply_snapshot(db, task_id, processing, now=NOW, poll_after=POLL_AFTER)

    answer = Snapshot(status=TaskStatus.PENDING, upstream_id="up_b")
    result = await _submit(engine, settings, Provider(answer, callback))
    assert (result.task.status, result.task.progress) == ("processing", 40)
    assert result.log_fields["outcome"] == "stale"
    assert "task_status" not in result.log_fields
    notes = await _rows(
        engine, "SELECT outcome FROM task_activity WHERE task_id = :t", t=result.task.id
    )
    assert [row.outcome for row in notes] == ["accepted"]


@ASYNC
async def test_an_answer_naming_another_tasks_provider_id_changes_nothing(
    engine: AsyncEngine, settings: Settings
) -> None:
    """The provider id of another task: a mismatch, the task stays submitting."""
    first = await _submit(engine, settings, Provider(Snapshot(TaskStatus.PENDING, "up_c")))
    second = await _submit(engine, settings, Provider(Snapshot(TaskStatus.PENDING, "up_c")))
    assert first.task.status == "pending"
    assert (second.task.status, second.task.upstream_task_id) == ("submitting", None)
    assert second.log_fields["outcome"] == "mismatch"


@ASYNC
async def test_a_taken_key_with_another_body_leaves_nothing_behind(
    engine: AsyncEngine, settings: Settings
) -> None:
    """The second request's task and event never commit; the provider is not called."""
    provider = Provider(Snapshot(TaskStatus.PENDING, "up_d"))
    await _submit(engine, settings, provider, key="key-d")
    other = TaskCreate.model_validate({"prompt": "another prompt"})
    factory = create_session_factory(engine)
    with pytest.raises(Unprocessable):
        await submit_task(
            engine, factory, provider, settings, other, owner="tests", idempotency_key="key-d"
        )  # type: ignore[arg-type]
    assert len(provider.bodies) == 1
    tasks = await _rows(engine, "SELECT id FROM tasks")
    events = await _rows(engine, "SELECT id FROM events")
    assert (len(tasks), len(events)) == (1, 1)


@ASYNC
async def test_the_created_event_reaches_the_owners_endpoints(
    engine: AsyncEngine, settings: Settings
) -> None:
    """Outbox rows for the task.created event, written in the same statement."""
    endpoint = {
        "id": "we_1",
        "owner": "tests",
        "url": "https://example.test/hook",
        "secret": "whsec_x",
        "event_types": ",task.created,",
        "enabled": True,
        "created_at": NOW,
        "updated_at": NOW,
    }
    async with engine.begin() as db:
        await db.execute(insert(metadata.tables["webhook_endpoints"]), endpoint)
    result = await _submit(engine, settings, Provider(Snapshot(TaskStatus.PENDING, "up_e")))
    rows = await _rows(
        engine, "SELECT target, status FROM webhook_deliveries WHERE task_id = :t", t=result.task.id
    )
    assert [(row.target, row.status) for row in rows] == [("we_1", "pending")]


class SlowProvider(Provider):
    """Answers after other requests had time to try the same key."""

    async def submit(self, body: dict[str, Any]) -> Snapshot:
        self.bodies.append(body)
        await asyncio.sleep(0.1)
        return self.answer


@ASYNC
async def test_concurrent_requests_with_one_key_make_one_task_and_one_submit(
    engine: AsyncEngine, settings: Settings
) -> None:
    """Same key, same body, at once: one task, one event, one provider call; the
    others are told it is in flight, and a later retry replays the same task."""
    provider = SlowProvider(Snapshot(TaskStatus.PENDING, "up_k"))
    results = await asyncio.gather(
        *[_submit(engine, settings, provider, key="key-k") for _ in range(4)],
        return_exceptions=True,
    )
    accepted = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, BaseException)]
    assert len(accepted) == 1
    assert all(isinstance(error, Conflict) for error in refused)
    assert len(provider.bodies) == 1
    tasks = await _rows(engine, "SELECT id FROM tasks")
    events = await _rows(engine, "SELECT id FROM events")
    assert ([row.id for row in tasks], len(events)) == ([accepted[0].task.id], 1)
    replay = await _submit(engine, settings, provider, key="key-k")
    assert (replay.replayed, replay.task.id) == (True, accepted[0].task.id)


@ASYNC
async def test_the_answered_task_is_the_row_as_stored(
    engine: AsyncEngine, settings: Settings
) -> None:
    """The task returned after the prepared answer equals the row read back, nested
    and unicode metadata, empty objects and image_urls included, and a replay too."""
    metadata = {"a": {"b": [1, 2.5, None, True, "é☃"], "c": {}}, "empty": {}, "z": "☃"}
    body = {
        "prompt": "a lighthouse",
        "metadata": metadata,
        "image_urls": ["https://example.test/a.png", "https://example.test/é.png"],
    }
    answer = Snapshot(TaskStatus.PENDING, "up_m", can_cancel=False, usage={"n": 1})
    factory = create_session_factory(engine)
    results = [
        await submit_task(
            engine,
            factory,
            Provider(answer),
            settings,
            TaskCreate.model_validate(body),
            owner="tests",
            idempotency_key="key-m",
        )  # type: ignore[arg-type]
        for _ in range(2)
    ]
    async with factory() as session:
        stored = await repository.get_task(session, results[0].task.id)
    assert stored is not None
    assert stored.meta == metadata
    assert [result.replayed for result in results] == [False, True]
    assert all(result.task.model_dump() == stored.model_dump() for result in results)
