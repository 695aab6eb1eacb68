"""Every SQL statement of the event log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, exists, insert, or_, select, text, tuple_
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection

import app.models  # noqa: F401  (registers the tables on the metadata)
from app.db import metadata

EVENTS: Table = metadata.tables["events"]
DELIVERIES: Table = metadata.tables["webhook_deliveries"]
_INSERT_EVENT = insert(EVENTS)
# The oldest transaction that may still append events here: every id below it has
# ended. Ids are server-wide, so a transaction seen running in another database is
# passed over (it cannot write our events); one that ended between the snapshot and
# that look is not seen there and still counts, which errs on the safe side.
_HORIZON = text(
    """
    WITH snap AS (SELECT pg_current_snapshot() AS s),
    elsewhere AS (
        SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
    )
    SELECT coalesce(
        (SELECT min(x::text::bigint) FROM snap, pg_snapshot_xip(snap.s) AS x
         WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid FROM elsewhere)),
        (SELECT pg_snapshot_xmax(s)::text::bigint FROM snap)
    )
    """
)


@dataclass(frozen=True)
class EventScope:
    """Whose events a reader sees: one owner's, one task's, or (both None) all.

    With a `viewer` (the reading token), events of other types than `shared`
    (those about an endpoint, not a task) are shown only to their owner,
    whatever the rest of the scope says.
    """

    owner: str | None = None
    task_id: str | None = None
    types: tuple[str, ...] = ()
    viewer: str | None = None
    shared: tuple[str, ...] = ()

    def may_see(self, kind: str, owner: str) -> bool:
        """Whether the viewer may see an event of this type and owner."""
        return self.viewer is None or owner == self.viewer or kind in self.shared


async def insert_event(db: AsyncConnection, values: dict[str, Any]) -> None:
    """Append one event (txid comes from the database's default)."""
    await db.execute(_INSERT_EVENT, values)


async def insert_events(db: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Append events in one statement, in the order given."""
    if rows:
        await db.execute(_INSERT_EVENT, list(rows))


async def horizon(db: AsyncConnection) -> int | None:
    """Events of transactions below this id may be served (PostgreSQL); None on SQLite."""
    if db.dialect.name != "postgresql":
        return None
    return int((await db.execute(_HORIZON)).scalar_one())


async def read_events(
    db: AsyncConnection,
    scope: EventScope,
    *,
    after: tuple[int, int] | None,
    limit: int,
    below_txid: int | None,
) -> Sequence[Row[Any, Any, Any, Any, Any, Any]]:
    """Events in log order after the cursor, only of transactions below `below_txid`."""
    conditions = []
    if scope.owner is not None:
        conditions.append(EVENTS.c.owner == scope.owner)
    if scope.task_id is not None:
        conditions.append(EVENTS.c.task_id == scope.task_id)
    if scope.types:
        conditions.append(EVENTS.c.type.in_(scope.types))
    if scope.viewer is not None:
        conditions.append(
            or_(EVENTS.c.owner == scope.viewer, EVENTS.c.type.in_(scope.shared or ("",)))
        )
    if after is not None:
        conditions.append(tuple_(EVENTS.c.txid, EVENTS.c.seq) > tuple_(*after))
    if below_txid is not None:
        conditions.append(EVENTS.c.txid < below_txid)
    statement = (
        select(
            EVENTS.c.seq,
            EVENTS.c.txid,
            EVENTS.c.id,
            EVENTS.c.type,
            EVENTS.c.created_at,
            EVENTS.c.data,
        )
        .where(*conditions)
        .order_by(EVENTS.c.txid, EVENTS.c.seq)
        .limit(limit)
    )
    return (await db.execute(statement)).all()


async def newest_position(db: AsyncConnection, *, below_txid: int | None) -> tuple[int, int] | None:
    """The last position in the log, among transactions below `below_txid` (None: empty)."""
    statement = select(EVENTS.c.txid, EVENTS.c.seq)
    if below_txid is not None:
        statement = statement.where(EVENTS.c.txid < below_txid)
    statement = statement.order_by(EVENTS.c.txid.desc(), EVENTS.c.seq.desc()).limit(1)
    row = (await db.execute(statement)).first()
    return (int(row.txid), int(row.seq)) if row is not None else None


async def prune_events(db: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` events created before `before`; how many went.

    An event some webhook delivery still refers to stays (deliveries are pruned first,
    pending ones never): a delivery never outlives its event.
    """
    referred = exists().where(DELIVERIES.c.event_id == EVENTS.c.id)
    oldest = (
        select(EVENTS.c.seq)
        .where(EVENTS.c.created_at < before, ~referred)
        .order_by(EVENTS.c.created_at)
        .limit(limit)
    )
    result = await db.execute(delete(EVENTS).where(EVENTS.c.seq.in_(oldest)))
    return int(cast(CursorResult[Any], result).rowcount)
