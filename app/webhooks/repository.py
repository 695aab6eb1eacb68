"""The SQL of webhook endpoints, the fan-out of each event into the outbox, and the
reading, redelivery and recovery of deliveries (claiming them is `outbox`'s)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Row,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection

import app.models  # noqa: F401  (registers the tables on the metadata)
from app.db import metadata

ENDPOINTS: Table = metadata.tables["webhook_endpoints"]
DELIVERIES: Table = metadata.tables["webhook_deliveries"]
ATTEMPTS: Table = metadata.tables["webhook_attempts"]
TASKS: Table = metadata.tables["tasks"]
EVENTS: Table = metadata.tables["events"]

TASK_TARGET = "task"  # the target of a delivery to the task's own webhook_url
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
DELIVERY_COLUMNS = (
    "event_id",
    "task_id",
    "owner",
    "target",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
)


def type_list(types: Sequence[str]) -> str:
    """Event types as stored: `,a,b,` (one LIKE finds a type's subscribers)."""
    return "," + ",".join(types) + ","


def parse_type_list(stored: str | None) -> list[str]:
    """The stored `,a,b,` form back as a list."""
    return [part for part in (stored or "").split(",") if part]


def _wants(column: Any, kind: str) -> Any:
    return column.like(f"%,{kind},%")


def fan_out_rows(
    event_id: Any,
    kind: str,
    task_id: Any,
    owner: Any,
    now: Any,
    *,
    own_url: bool | None = None,
    after: Any = None,
) -> Any:
    """The outbox rows of one event, as a SELECT: one per the owner's enabled endpoint
    that wants its type, and one for the task's own webhook_url if it wants it.

    `event_id`, `task_id`, `owner` and `now` are SQL expressions (literals or bind
    parameters). `own_url` says whether the task's own URL wants the event when the
    task's row is not visible to the statement (inserted by the same statement);
    None reads it from the row. `after`, a condition, gates every row (the event's
    own insert in the same statement).
    """

    def columns(target: Any) -> list[Any]:
        return [event_id, task_id, owner, target, literal(PENDING), literal(0), now, now, now]

    endpoints = select(*columns(ENDPOINTS.c.id)).where(
        ENDPOINTS.c.owner == owner,
        ENDPOINTS.c.enabled.is_(True),
        _wants(ENDPOINTS.c.event_types, kind),
    )
    if after is not None:
        endpoints = endpoints.where(after)
    if own_url is False:
        return endpoints
    if own_url:
        own = select(*columns(literal(TASK_TARGET)))
        if after is not None:
            own = own.where(after)
    else:
        own = select(*columns(literal(TASK_TARGET))).where(
            TASKS.c.id == task_id,
            TASKS.c.webhook_url.is_not(None),
            TASKS.c.webhook_gone_at.is_(None),  # it answered 410 Gone: nothing more
            _wants(TASKS.c.webhook_events, kind),
        )
        if after is not None:
            own = own.where(after)
    return union_all(endpoints, own)


def wants_own_url(webhook_url: str | None, webhook_events: str | None, kind: str) -> bool:
    """Whether a new task's own webhook_url hears `kind` (`fan_out_rows`'s rule for a row
    it cannot read yet; a new task has never answered 410)."""
    return webhook_url is not None and kind in parse_type_list(webhook_events)


async def fan_out(
    db: AsyncConnection, *, event_id: str, kind: str, task_id: str, owner: str, now: datetime
) -> None:
    """One statement: queue the event for each of the owner's enabled endpoints that
    want its type, and for the task's own webhook_url if it wants it."""
    stamp = literal(now, ENDPOINTS.c.created_at.type)
    rows = fan_out_rows(literal(event_id), kind, literal(task_id), literal(owner), stamp)
    await db.execute(insert(DELIVERIES).from_select(list(DELIVERY_COLUMNS), rows))


_FAN_OUT_EVENTS: dict[str, Any] = {}


def _fan_out_events_statement(kind: str) -> Any:
    stamp = bindparam("now", type_=ENDPOINTS.c.created_at.type)
    chosen = EVENTS.c.id == any_(bindparam("event_ids", type_=postgresql.ARRAY(Text)))
    rows = fan_out_rows(EVENTS.c.id, kind, EVENTS.c.task_id, EVENTS.c.owner, stamp, after=chosen)
    return insert(DELIVERIES).from_select(list(DELIVERY_COLUMNS), rows)


async def fan_out_events(
    db: AsyncConnection, *, kind: str, event_ids: Sequence[str], now: datetime
) -> None:
    """`fan_out` of many events of one type already inserted in this transaction, in
    one statement (PostgreSQL), built once per type: the same rows, read from the
    events themselves."""
    statement = _FAN_OUT_EVENTS.get(kind)
    if statement is None:
        statement = _FAN_OUT_EVENTS[kind] = _fan_out_events_statement(kind)
    await db.execute(statement, {"event_ids": list(event_ids), "now": now})


# -- endpoints -----------------------------------------------------------------------


async def insert_endpoint(db: AsyncConnection, values: dict[str, Any]) -> None:
    """Add one endpoint."""
    await db.execute(insert(ENDPOINTS), values)


async def count_endpoints(db: AsyncConnection, owner: str) -> int:
    """How many endpoints the owner has, counted under a lock on the owner's name
    (PostgreSQL; SQLite writes one at a time): two creations at once cannot both
    pass a cap."""
    if db.dialect.name == "postgresql":
        await db.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('webhook_endpoints:' || :owner))"),
            {"owner": owner},
        )
    statement = select(func.count()).select_from(ENDPOINTS).where(ENDPOINTS.c.owner == owner)
    return int((await db.execute(statement)).scalar_one())


async def list_endpoints(db: AsyncConnection, owner: str) -> Sequence[Row[Any]]:
    """The owner's endpoints, oldest first."""
    statement = (
        select(ENDPOINTS)
        .where(ENDPOINTS.c.owner == owner)
        .order_by(ENDPOINTS.c.created_at, ENDPOINTS.c.id)
    )
    return (await db.execute(statement)).all()


async def get_endpoint(db: AsyncConnection, owner: str, endpoint_id: str) -> Row[Any] | None:
    """One of the owner's endpoints (None: not theirs, or none)."""
    statement = select(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.owner == owner)
    return (await db.execute(statement)).first()


async def update_endpoint(
    db: AsyncConnection, owner: str, endpoint_id: str, values: dict[str, Any]
) -> bool:
    """Change one of the owner's endpoints; False when there is none."""
    result = await db.execute(
        update(ENDPOINTS)
        .where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.owner == owner)
        .values(**values)
    )
    return int(cast(CursorResult[Any], result).rowcount) > 0


async def delete_endpoint(db: AsyncConnection, owner: str, endpoint_id: str, now: datetime) -> bool:
    """Remove one of the owner's endpoints; what was still queued for it fails."""
    result = await db.execute(
        delete(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.owner == owner)
    )
    if not int(cast(CursorResult[Any], result).rowcount):
        return False
    await fail_pending(db, now, "endpoint deleted", DELIVERIES.c.target == endpoint_id)
    return True


async def disable_endpoint(
    db: AsyncConnection, endpoint_id: str, reason: str, now: datetime
) -> Row[Any] | None:
    """Disable an enabled endpoint and fail what was queued for it; its row, None if it was not
    enabled (another worker got there first)."""
    result = await db.execute(
        update(ENDPOINTS)
        .where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.enabled.is_(True))
        .values(enabled=False, disabled_reason=reason, updated_at=now)
    )
    if not int(cast(CursorResult[Any], result).rowcount):
        return None
    await fail_pending(db, now, f"endpoint disabled ({reason})", DELIVERIES.c.target == endpoint_id)
    return (await db.execute(select(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id))).first()


async def lock_endpoint(db: AsyncConnection, endpoint_id: str) -> None:
    """Hold the endpoint's row for the transaction (PostgreSQL; SQLite writes one at a time).

    Every transaction that writes an endpoint and its deliveries takes this lock
    first, so they queue on it instead of deadlocking on each other's rows.
    """
    if db.dialect.name == "postgresql":
        await db.execute(
            select(ENDPOINTS.c.id).where(ENDPOINTS.c.id == endpoint_id).with_for_update()
        )


async def note_endpoint_result(
    db: AsyncConnection, endpoint_id: str, *, ok: bool, now: datetime
) -> datetime | None:
    """A success clears `failing_since`; a failure sets it if unset. Since when it has failed."""
    if ok:
        await db.execute(
            update(ENDPOINTS)
            .where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.failing_since.is_not(None))
            .values(failing_since=None)
        )
        return None
    await db.execute(
        update(ENDPOINTS)
        .where(ENDPOINTS.c.id == endpoint_id, ENDPOINTS.c.failing_since.is_(None))
        .values(failing_since=now)
    )
    row = (
        await db.execute(select(ENDPOINTS.c.failing_since).where(ENDPOINTS.c.id == endpoint_id))
    ).first()
    return row.failing_since if row is not None else None


def not_leased(now: datetime) -> Any:
    """No attempt holds the delivery right now (no lease, or an expired one)."""
    return or_(DELIVERIES.c.lease_until.is_(None), DELIVERIES.c.lease_until < now)


async def mark_task_url_gone(db: AsyncConnection, task_id: str, now: datetime) -> None:
    """The task's webhook_url answered 410: no later event is queued for it."""
    await db.execute(
        update(TASKS)
        .where(TASKS.c.id == task_id, TASKS.c.webhook_gone_at.is_(None))
        .values(webhook_gone_at=now)
    )


async def fail_pending(db: AsyncConnection, now: datetime, reason: str, *where: Any) -> int:
    """Give up the pending deliveries that match `where`; how many.

    A delivery being sent right now keeps its lease (the fencing of its attempt):
    the attempt's outcome decides, and a retry finds the target gone and fails then.
    """
    result = await db.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.status == PENDING, not_leased(now), *where)
        .values(
            status=FAILED,
            last_error=reason,
            next_attempt_at=None,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )
    )
    return int(cast(CursorResult[Any], result).rowcount)


# -- reading, redelivery, recovery ---------------------------------------------------


async def deliveries_of(
    db: AsyncConnection, event_ids: Sequence[str], owner: str
) -> dict[str, list[tuple[Row[Any], list[Row[Any]]]]]:
    """Each event's deliveries (the owner's) with their attempts, oldest first."""
    if not event_ids:
        return {}
    rows = (
        await db.execute(
            select(DELIVERIES)
            .where(DELIVERIES.c.event_id.in_(list(event_ids)), DELIVERIES.c.owner == owner)
            .order_by(DELIVERIES.c.id)
        )
    ).all()
    ids = [row.id for row in rows]
    attempts: dict[int, list[Row[Any]]] = {delivery_id: [] for delivery_id in ids}
    if ids:
        for attempt in (
            await db.execute(
                select(ATTEMPTS).where(ATTEMPTS.c.delivery_id.in_(ids)).order_by(ATTEMPTS.c.id)
            )
        ).all():
            attempts[attempt.delivery_id].append(attempt)
    result: dict[str, list[tuple[Row[Any], list[Row[Any]]]]] = {}
    for row in rows:
        result.setdefault(row.event_id, []).append((row, attempts[row.id]))
    return result


def _again(now: datetime) -> dict[str, Any]:
    return {
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "lease_owner": None,
        "lease_until": None,
        "delivered_at": None,
        "updated_at": now,
    }


async def event_row(db: AsyncConnection, event_id: str, owner: str) -> Row[Any] | None:
    """One of the owner's events."""
    statement = select(EVENTS).where(EVENTS.c.id == event_id, EVENTS.c.owner == owner)
    return (await db.execute(statement)).first()


async def redeliver(
    db: AsyncConnection, *, event_id: str, kind: str, task_id: str, owner: str, now: datetime
) -> int:
    """Send the event again to every target it has, and to new subscribers; how many."""
    result = await db.execute(
        update(DELIVERIES)
        .where(
            DELIVERIES.c.event_id == event_id,
            # A delivery being sent right now finishes first; it is not sent twice at once.
            not_leased(now),
        )
        .values(**_again(now))
    )
    reset = int(cast(CursorResult[Any], result).rowcount)
    before = await _count(db, event_id)
    existing = select(DELIVERIES.c.target).where(DELIVERIES.c.event_id == event_id)
    endpoints = select(
        literal(event_id),
        literal(task_id),
        literal(owner),
        ENDPOINTS.c.id,
        literal(PENDING),
        literal(0),
        literal(now, ENDPOINTS.c.created_at.type),
        literal(now, ENDPOINTS.c.created_at.type),
        literal(now, ENDPOINTS.c.created_at.type),
    ).where(
        ENDPOINTS.c.owner == owner,
        ENDPOINTS.c.enabled.is_(True),
        _wants(ENDPOINTS.c.event_types, kind),
        ENDPOINTS.c.id.not_in(existing),
    )
    await db.execute(insert(DELIVERIES).from_select(list(DELIVERY_COLUMNS), endpoints))
    return reset + (await _count(db, event_id) - before)


async def _count(db: AsyncConnection, event_id: str) -> int:
    statement = select(DELIVERIES.c.id).where(DELIVERIES.c.event_id == event_id)
    return len((await db.execute(statement)).all())


async def recover(
    db: AsyncConnection, endpoint_id: str, *, since: datetime, until: datetime, now: datetime
) -> int:
    """Queue again the endpoint's failed deliveries of events created in [since, until)."""
    result = await db.execute(
        update(DELIVERIES)
        .where(
            DELIVERIES.c.target == endpoint_id,
            DELIVERIES.c.status == FAILED,
            not_leased(now),
            and_(DELIVERIES.c.created_at >= since, DELIVERIES.c.created_at < until),
        )
        .values(**_again(now))
    )
    return int(cast(CursorResult[Any], result).rowcount)
