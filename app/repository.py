"""Every SQL statement of the service. Functions add, flush and execute;
they never commit (the caller's unit of work does)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlmodel import col

from app.db import metadata
from app.models import (
    IdempotencyRecord,
    ImageStatus,
    Task,
    TaskStatus,
)

ACTIVE_STATUSES = tuple(status.value for status in TaskStatus if not status.terminal)


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _insert(session: AsyncSession, model: type[Any]) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


async def get_task(session: AsyncSession, task_id: str) -> Task | None:
    """One task by our id, as it is in the database now."""
    statement = (
        select(Task).where(col(Task.id) == task_id).execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def add_task(session: AsyncSession, task: Task) -> None:
    """Insert a new task."""
    session.add(task)
    await session.flush()


async def claim_idempotency_key(session: AsyncSession, record: IdempotencyRecord) -> bool:
    """Insert the key if it is new; True when this request owns it."""
    statement = (
        _insert(session, IdempotencyRecord)
        .values(**record.model_dump())
        .on_conflict_do_nothing(index_elements=["owner", "key"])
    )
    result = await session.execute(statement)
    return bool(_rowcount(result))


async def get_idempotency_record(
    session: AsyncSession, owner: str, key: str
) -> IdempotencyRecord | None:
    """The record a key was first bound to."""
    return await session.get(IdempotencyRecord, (owner, key))


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    image_status: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


async def list_tasks(
    session: AsyncSession,
    filters: TaskFilter,
    *,
    limit: int,
    after: tuple[datetime, str] | None,
) -> Sequence[Task]:
    """Newest first, by keyset: (created_at, id) strictly below the cursor."""
    conditions: list[ColumnElement[bool]] = []
    if filters.status:
        conditions.append(col(Task.status) == filters.status)
    if filters.image_status:
        conditions.append(col(Task.image_status) == filters.image_status)
    if filters.created_after:
        conditions.append(col(Task.created_at) >= filters.created_after)
    if filters.created_before:
        conditions.append(col(Task.created_at) < filters.created_before)
    if after:
        conditions.append(tuple_(col(Task.created_at), col(Task.id)) < tuple_(*after))
    statement = (
        select(Task)
        .where(*conditions)
        .order_by(col(Task.created_at).desc(), col(Task.id).desc())
        .limit(limit)
    )
    return (await session.execute(statement)).scalars().all()


# Core statements on the tables skip the ORM's per-row work (the webhook's hot path).
TASKS: Table = metadata.tables["tasks"]
DELIVERIES: Table = metadata.tables["callback_deliveries"]
# The task can still move: the guard of every write that must not touch a settled task.
IS_ACTIVE: ColumnElement[bool] = TASKS.c.status.in_(ACTIVE_STATUSES)


@dataclass(frozen=True)
class TaskState:
    """The few columns the state machine decides on."""

    id: str
    status: TaskStatus
    progress: int
    upstream_task_id: str | None


# Built once: constructing a statement costs more than running its cached SQL.
_SELECT_STATE = select(
    TASKS.c.id, TASKS.c.status, TASKS.c.progress, TASKS.c.upstream_task_id
).where(TASKS.c.id == bindparam("task_id"))
_INSERT_DELIVERY = insert(DELIVERIES)


async def task_state(db: AsyncConnection, task_id: str) -> TaskState | None:
    """A task's status, progress and provider id, without loading the whole row."""
    row = (await db.execute(_SELECT_STATE, {"task_id": task_id})).first()
    if row is None:
        return None
    return TaskState(row.id, TaskStatus(row.status), row.progress, row.upstream_task_id)


async def upstream_id_taken(db: AsyncConnection, upstream_id: str, other_than: str) -> bool:
    """Whether another task already carries this provider id."""
    statement = select(TASKS.c.id).where(
        TASKS.c.upstream_task_id == upstream_id, TASKS.c.id != other_than
    )
    return (await db.execute(statement)).first() is not None


async def update_where(
    db: AsyncConnection, task_id: str, condition: ColumnElement[bool], values: dict[str, Any]
) -> bool:
    """A conditional update: True when the row still matched and changed.

    This is what makes concurrent duplicate deliveries safe: on PostgreSQL the
    second UPDATE waits for the first's row lock, then re-checks `condition`
    against the committed row and matches nothing.
    """
    statement = update(TASKS).where(TASKS.c.id == task_id, condition).values(**values)
    return bool(_rowcount(await db.execute(statement)))


async def insert_delivery(db: AsyncConnection, values: dict[str, Any]) -> None:
    """Keep one row per accepted webhook delivery."""
    await db.execute(_INSERT_DELIVERY, values)


async def update_task_where(
    session: AsyncSession, task_id: str, condition: ColumnElement[bool], values: dict[str, Any]
) -> bool:
    """`update_where` inside a session's transaction (loaded objects are not refreshed)."""
    return await update_where(await session.connection(), task_id, condition, values)


def _poll_due(now: datetime) -> ColumnElement[bool]:
    """Active, its next poll due, and no live lease on it."""
    return and_(
        col(Task.next_poll_at) <= now,
        IS_ACTIVE,
        or_(col(Task.poll_lease_until).is_(None), col(Task.poll_lease_until) < now),
    )


async def claim_due_polls(
    session: AsyncSession, *, now: datetime, lease: timedelta, limit: int
) -> Sequence[Task]:
    """Lease the active tasks whose next poll is due; replicas skip each other's rows."""
    due = (
        select(col(Task.id))
        .where(_poll_due(now))
        .order_by(col(Task.next_poll_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return await _lease(session, due, {"poll_lease_until": now + lease})


async def claim_poll(
    session: AsyncSession, task_id: str, *, now: datetime, lease: timedelta
) -> Task | None:
    """Lease one task's poll if it is still due (a confirmation); None if it is not."""
    claimed = await update_task_where(
        session, task_id, _poll_due(now), {"poll_lease_until": now + lease}
    )
    return await get_task(session, task_id) if claimed else None


async def claim_due_downloads(
    session: AsyncSession, *, now: datetime, owner: str, lease: timedelta, limit: int
) -> Sequence[Task]:
    """Lease queued downloads that are due and not held by a live worker."""
    due = (
        select(col(Task.id))
        .where(
            col(Task.image_status) == ImageStatus.PENDING,
            col(Task.image_next_attempt_at) <= now,
            or_(col(Task.image_lease_until).is_(None), col(Task.image_lease_until) < now),
        )
        .order_by(col(Task.image_next_attempt_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    values = {
        "image_lease_owner": owner,
        "image_lease_until": now + lease,
        "image_attempts": col(Task.image_attempts) + 1,
    }
    return await _lease(session, due, values)


async def _lease(session: AsyncSession, due: Any, values: dict[str, Any]) -> Sequence[Task]:
    ids = (await session.execute(due)).scalars().all()
    if not ids:
        return []
    await session.execute(
        update(Task)
        .where(col(Task.id).in_(ids))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    statement = select(Task).where(col(Task.id).in_(ids)).execution_options(populate_existing=True)
    return (await session.execute(statement)).scalars().all()


async def update_download(
    session: AsyncSession, task_id: str, owner: str, values: dict[str, Any]
) -> bool:
    """Write a download's result, but only while this worker still holds the lease."""
    condition = and_(
        col(Task.image_lease_owner) == owner,
        col(Task.image_status) == ImageStatus.PENDING,
    )
    return await update_task_where(session, task_id, condition, values)


async def release_download_leases(session: AsyncSession, owner: str) -> int:
    """Give back every lease a stopping worker holds, so another starts at once."""
    result = await session.execute(
        update(Task)
        .where(col(Task.image_lease_owner) == owner, col(Task.image_status) == ImageStatus.PENDING)
        .values(image_lease_until=None, image_lease_owner=None)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


async def download_queue_stats(session: AsyncSession) -> tuple[int, datetime | None]:
    """How many downloads are queued, and since when the oldest has waited."""
    statement = select(func.count(), func.min(col(Task.completed_at))).where(
        col(Task.image_status) == ImageStatus.PENDING
    )
    count, oldest = (await session.execute(statement)).one()
    return int(count), oldest
