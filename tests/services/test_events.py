"""The event log's writer (through the state machine and submit paths), its
cursor under concurrent transactions, and retention."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine, create_session_factory
from app.events import repository as event_repository
from app.events.feed import decode_cursor, read_page
from app.events.repository import EventScope
from app.models import Task, TaskStatus, utcnow
from app.schemas import Snapshot, SnapshotImage
from app.services import events
from app.services.snapshots import Outcome, apply_snapshot
from tests.factories import make_task
from tests.postgres import server_database_url

pytestmark = pytest.mark.asyncio(loop_scope="session")

POLL = timedelta(seconds=120)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the parametrized, migrated database."""
    built = create_engine(database_url)
    yield built
    await built.dispose()


async def new_task(engine: AsyncEngine, **fields: Any) -> Task:
    async with create_session_factory(engine)() as session:
        return await make_task(session, **fields)


async def apply(engine: AsyncEngine, task_id: str, snapshot: Snapshot, **kw: Any) -> Outcome:
    async with engine.begin() as db:
        applied = await apply_snapshot(db, task_id, snapshot, poll_after=POLL, **kw)
    return applied.outcome


async def story(engine: AsyncEngine, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with engine.connect() as db:
        rows = await event_repository.read_events(
            db, EventScope(task_id=task_id), after=None, limit=100, below_txid=None
        )
    return [(row.type, row.data) for row in rows]


async def test_progress_events_are_throttled_and_completion_lists_the_queued_images(
    engine: AsyncEngine,
) -> None:
    """pending→processing tells; more progress within the interval does not; later it does."""
    task = await new_task(engine, n=2, model="gpt-image-2")
    start = utcnow()
    await apply(engine, task.id, Snapshot(TaskStatus.PROCESSING, progress=10), now=start)
    later = start + timedelta(seconds=1)
    await apply(engine, task.id, Snapshot(TaskStatus.PROCESSING, progress=20), now=later)
    beyond = start + events.PROGRESS_EVENT_INTERVAL + timedelta(seconds=1)
    await apply(engine, task.id, Snapshot(TaskStatus.PROCESSING, progress=60), now=beyond)
    assert await apply(
        engine, task.id, Snapshot(TaskStatus.PROCESSING, progress=60), now=beyond
    ) is (Outcome.DUPLICATE)
    done = Snapshot(
        TaskStatus.COMPLETED,
        images=(SnapshotImage("https://cdn.example.com/a.png"), SnapshotImage("https://b")),
    )
    await apply(engine, task.id, done, now=beyond + timedelta(seconds=1))
    told = await story(engine, task.id)
    assert [(kind, data["progress"]) for kind, data in told] == [
        ("task.processing", 10),
        ("task.processing", 60),
        ("task.completed", 100),
    ]
    completed = told[-1][1]
    assert [image["status"] for image in completed["images"]] == ["pending", "pending"]
    assert completed["settled"] is False
    assert completed["id"] == task.id
    assert completed["status"] == "completed"


@pytest.mark.parametrize(
    ("status", "kind"),
    [(TaskStatus.FAILED, "task.failed"), (TaskStatus.CANCELLED, "task.cancelled")],
)
async def test_a_terminal_move_tells_once_and_the_task_is_settled(
    engine: AsyncEngine, status: TaskStatus, kind: str
) -> None:
    """The move appends its event; the same news again appends nothing."""
    task = await new_task(engine)
    snapshot = Snapshot(status, error_code="x_code", error_message="why")
    assert await apply(engine, task.id, snapshot, now=utcnow()) is Outcome.APPLIED
    assert await apply(engine, task.id, snapshot, now=utcnow()) is Outcome.DUPLICATE
    ((told, data),) = await story(engine, task.id)
    assert told == kind
    assert data["settled"] is True
    assert data["error"]["code"] == "x_code"


async def test_an_event_exists_only_if_its_change_committed(engine: AsyncEngine) -> None:
    """A rolled-back transition leaves neither the change nor its event."""
    task = await new_task(engine)
    async with engine.connect() as db:
        await db.begin()
        await apply_snapshot(
            db, task.id, Snapshot(TaskStatus.FAILED), now=utcnow(), poll_after=POLL
        )
        assert [kind for kind, _ in await story_in(db, task.id)] == ["task.failed"]
        await db.rollback()
    assert await story(engine, task.id) == []


async def story_in(db: Any, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    rows = await event_repository.read_events(
        db, EventScope(task_id=task_id), after=None, limit=100, below_txid=None
    )
    return [(row.type, row.data) for row in rows]


async def test_event_ids_are_evt_and_a_ulid() -> None:
    """`evt_` and 26 Crockford characters; ids made later sort later."""
    first = events.new_event_id()
    assert re.fullmatch(r"evt_[0-9A-HJKMNP-TV-Z]{26}", first)
    assert len({events.new_event_id() for _ in range(100)}) == 100


async def test_pruning_deletes_old_events_in_batches_and_keeps_recent_ones(
    engine: AsyncEngine,
) -> None:
    """Only events older than the cut-off go, at most a batch at a time."""
    task = await new_task(engine)
    old = utcnow() - timedelta(days=40)
    async with engine.begin() as db:
        for _ in range(3):
            await events.record(db, events.EventType.TASK_CREATED, task, [], now=old)
        await events.record(db, events.EventType.TASK_FAILED, task, [], now=utcnow())
    cutoff = utcnow() - timedelta(days=30)
    async with engine.begin() as db:
        assert await event_repository.prune_events(db, before=cutoff, limit=2) == 2
    async with engine.begin() as db:
        assert await event_repository.prune_events(db, before=cutoff, limit=2) == 1
    assert [kind for kind, _ in await story(engine, task.id)] == ["task.failed"]


async def test_feed_pages_follow_the_cursor_without_repeats(engine: AsyncEngine) -> None:
    """Five events read two at a time: every one once, in order, then an empty page."""
    task = await new_task(engine)
    async with engine.begin() as db:
        ids = [
            await events.record(db, events.EventType.TASK_CREATED, task, [], now=utcnow())
            for _ in range(5)
        ]
    await visible(engine, EventScope(task_id=task.id), 5)
    seen: list[str] = []
    after = None
    for _ in range(4):
        page = await read_page(engine, EventScope(), after=after, limit=2, base="https://x")
        seen += [event.id for event in page.items]
        after = decode_cursor(page.next_cursor) if page.next_cursor else None
    assert seen == ids
    assert not page.has_more


async def visible(engine: AsyncEngine, scope: EventScope, count: int) -> None:
    """Wait until `count` events are served: on PostgreSQL an event is held back while any
    older transaction on the server (another test's, say) is still running."""
    for _ in range(600):
        page = await read_page(engine, scope, after=None, limit=count, base="")
        if len(page.items) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} events became visible")


@pytest.mark.postgres
@pytest.mark.parametrize("first_to_commit", ["later_started", "earlier_started"])
async def test_the_cursor_never_passes_an_event_that_commits_late(
    postgres_database: str, first_to_commit: str
) -> None:
    """Two transactions append; one commits, a reader follows the feed, then the other
    commits: the reader's next page still holds it, and nothing is served twice."""
    engine = create_engine(postgres_database)
    task = await new_task(engine)
    earlier, later = await engine.connect(), await engine.connect()
    try:
        await earlier.begin()
        await later.begin()
        # Transaction ids are taken in this order; the events are appended the other way.
        await earlier.execute(text("SELECT pg_current_xact_id()"))
        await later.execute(text("SELECT pg_current_xact_id()"))
        later_id = await events.record(later, events.EventType.TASK_CREATED, task, [], now=utcnow())
        earlier_id = await events.record(
            earlier, events.EventType.TASK_FAILED, task, [], now=utcnow()
        )
        first, last = (later, earlier) if first_to_commit == "later_started" else (earlier, later)
        await first.commit()
        scope = EventScope(task_id=task.id)
        page = await read_page(engine, scope, after=None, limit=10, base="")
        served = [event.id for event in page.items]
        await last.commit()
        # Follow the cursor until both are served (another test's transaction on the same
        # server may hold them back a while): neither may be skipped or repeated.
        for _ in range(600):
            position = decode_cursor(page.next_cursor) if page.next_cursor else None
            page = await read_page(engine, scope, after=position, limit=10, base="")
            served += [event.id for event in page.items]
            if len(served) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(served) == sorted([earlier_id, later_id])
        if first_to_commit == "later_started":
            assert served == [earlier_id, later_id]  # held back until the older one ended
    finally:
        for connection in (earlier, later):
            await connection.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_transaction_in_another_database_never_holds_the_feed_back(
    postgres_database: str,
) -> None:
    """Transaction ids are server-wide, but only this database's writers can append
    events: a long transaction in another database on the same server delays nothing."""
    engine = create_engine(postgres_database)
    elsewhere_engine = create_engine(server_database_url("postgres"))
    task = await new_task(engine)
    try:
        async with elsewhere_engine.connect() as elsewhere:
            await elsewhere.begin()
            await elsewhere.execute(text("SELECT pg_current_xact_id()"))  # older and running
            async with engine.begin() as db:
                event_id = await events.record(
                    db, events.EventType.TASK_CREATED, task, [], now=utcnow()
                )
            page = await read_page(
                engine, EventScope(task_id=task.id), after=None, limit=10, base=""
            )
            assert [event.id for event in page.items] == [event_id]
            await elsewhere.rollback()
    finally:
        await elsewhere_engine.dispose()
        await engine.dispose()
