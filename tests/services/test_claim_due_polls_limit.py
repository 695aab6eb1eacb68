"""claim_due_polls leases no more than its limit, whatever plan PostgreSQL picks: its
due ids are chosen once, never by a subquery a nested loop rescans for each row."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository
from app.db import create_engine, create_session_factory
from app.models import utcnow
from tests.factories import make_task
from tests.helpers import with_plan

pytestmark = pytest.mark.asyncio(loop_scope="session")

PLANNER_SETTINGS = (
    (),
    ("enable_hashjoin", "enable_mergejoin"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material", "enable_hashagg"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material", "enable_hashagg", "enable_sort"),
)


@pytest_asyncio.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


async def due_tasks(engine: AsyncEngine, count: int) -> None:
    """`count` processing tasks whose next poll is due, one millisecond apart."""
    now = utcnow()
    async with create_session_factory(engine)() as session:
        for k in range(count):
            await make_task(
                session,
                status="processing",
                next_poll_at=now - timedelta(seconds=10) + timedelta(milliseconds=k),
            )


async def claim(engine: AsyncEngine, limit: int, *, settings: tuple[str, ...] = ()) -> list[str]:
    async with engine.begin() as db:
        for setting in settings:
            await db.execute(text(f"SET LOCAL {setting} = off"))
        claims = await repository.claim_due_polls(
            db, now=utcnow(), lease=timedelta(seconds=60), spacing=timedelta(0), limit=limit
        )
    return [c.id for c in claims]


async def leased(engine: AsyncEngine) -> int:
    statement = text("SELECT count(*) FROM tasks WHERE poll_lease_until IS NOT NULL")
    async with engine.connect() as db:
        return int((await db.execute(statement)).scalar_one())


async def test_a_poll_claim_leases_no_more_than_its_limit_when_statistics_are_stale(
    engine: AsyncEngine,
) -> None:
    """The tasks table analyzed while it held one row; thirty more fit its first page,
    so the planner still expects one. A claim of one leases one, not every due task."""
    await due_tasks(engine, 1)
    if engine.dialect.name == "postgresql":
        async with engine.begin() as db:
            await db.execute(text("ANALYZE tasks"))
    await due_tasks(engine, 30)
    first = await claim(engine, limit=1)
    assert (len(first), await leased(engine)) == (1, 1)
    second = await claim(engine, limit=3)
    assert (len(second), await leased(engine)) == (3, 4)
    assert not set(first) & set(second)


@pytest.mark.parametrize("settings", PLANNER_SETTINGS, ids=lambda s: "-".join(s) or "default")
async def test_a_poll_claim_holds_its_limit_whatever_join_the_planner_picks(
    engine: AsyncEngine, settings: tuple[str, ...]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("planner settings are PostgreSQL's")
    await due_tasks(engine, 40)
    async with engine.begin() as db:
        await db.execute(text("ANALYZE tasks"))
    claimed = await claim(engine, limit=2, settings=settings)
    assert (len(claimed), await leased(engine)) == (2, 2)
    oldest = await claim(engine, limit=40)
    assert len(oldest) == 38
    async with engine.connect() as db:
        ids = (await db.execute(text("SELECT id FROM tasks"))).scalars().all()
    assert sorted(claimed + oldest) == sorted(ids)


async def confirmation_claim_plan(engine: AsyncEngine) -> tuple[list[str], str]:
    """A confirmation-only claim's leased ids, and the database's plan for its statement."""

    async def claim() -> list[str]:
        async with engine.begin() as db:
            claims = await repository.claim_due_polls(
                db,
                now=utcnow(),
                lease=timedelta(seconds=60),
                spacing=timedelta(0),
                limit=64,
                confirmations_only=True,
            )
        return [c.id for c in claims]

    # "UPDATE tasks": the claim itself, not SQLite's BEGIN IMMEDIATE.
    return await with_plan(engine, "UPDATE tasks", claim)


async def test_a_confirmation_claim_goes_straight_to_the_tasks_asking_for_one(
    engine: AsyncEngine,
) -> None:
    """Hundreds of tasks due for a routine poll (a provider outage's backlog) and three
    callbacks asking for a confirmation: the confirmation claim reads the three by an
    index of their own, not every due poll that comes before them."""
    await due_tasks(engine, 400)
    now = utcnow()
    asking = []
    async with create_session_factory(engine)() as session:
        for _ in range(3):
            task = await make_task(
                session, status="processing", next_poll_at=now, confirm_requested_at=now
            )
            asking.append(task.id)
    async with engine.begin() as db:
        # With statistics, as PostgreSQL's autovacuum keeps them (SQLite's planner
        # without them prefers the status index: every active task).
        await db.execute(text("ANALYZE tasks"))
    claimed, plan = await confirmation_claim_plan(engine)
    assert sorted(claimed) == sorted(asking)
    assert "ix_tasks_confirm_due" in plan, plan


@pytest.mark.parametrize("statistics", ["none", "taken_empty", "taken_with_none_waiting"])
async def test_on_sqlite_the_confirmation_claim_uses_its_index_whatever_the_statistics(
    engine: AsyncEngine, statistics: str
) -> None:
    """SQLite's planner picks by whatever statistics it has, taken whenever: with none it
    walks the status index, with some taken while no confirmation waited (the usual
    moment: they last a fraction of a second) the `next_poll_at` index. The claim names
    its index, so neither reads past the due routine polls."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's planner sizes a partial index without statistics")
    if statistics == "taken_empty":
        async with engine.begin() as db:
            await db.execute(text("ANALYZE"))
    await due_tasks(engine, 400)
    if statistics == "taken_with_none_waiting":
        async with engine.begin() as db:
            await db.execute(text("ANALYZE"))
    async with create_session_factory(engine)() as session:
        now = utcnow()
        asking = await make_task(
            session, status="processing", next_poll_at=now, confirm_requested_at=now
        )
    claimed, plan = await confirmation_claim_plan(engine)
    assert claimed == [asking.id]
    assert "ix_tasks_confirm_due" in plan, plan
