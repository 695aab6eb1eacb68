"""Reading the event log in order: cursors, scopes and pages."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import Unprocessable
from app.events import repository
from app.events.bus import Notice
from app.events.repository import EventScope
from app.events.schemas import EventPublic
from app.services.events import TASK_EVENTS, EventType
from app.task_view import absolute_urls

_CURSOR = re.compile(r"(\d{1,19})\.(\d{1,19})")
_LARGEST = 2**63 - 1  # both parts are compared with BIGINT columns
EVENT_TYPES = tuple(kind.value for kind in EventType)
# Events any token may read with scope=all; the others (about an endpoint) only their owner.
SHARED_TYPES = tuple(kind.value for kind in TASK_EVENTS)


def encode_cursor(txid: int, seq: int) -> str:
    """An opaque position in the log: after this event."""
    return f"{txid}.{seq}"


def decode_cursor(value: str, field: str = "after") -> tuple[int, int]:
    """A cursor this service issued; 422 naming `field` otherwise."""
    match = _CURSOR.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2])) > _LARGEST:
        reason = "not a cursor this service issued"
        raise Unprocessable(f"{field}: {reason}", details=[{"field": field, "reason": reason}])
    return int(match[1]), int(match[2])


def parse_types(value: str | None) -> tuple[str, ...]:
    """Comma-separated event types; 422 on one that does not exist."""
    if not value:
        return ()
    types = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [kind for kind in types if kind not in EVENT_TYPES]
    if unknown:
        reason = f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})"
        raise Unprocessable(f"types: {reason}", details=[{"field": "types", "reason": reason}])
    return types


def matches(scope: EventScope, notice: Notice) -> bool:
    """Whether a committed event may concern a reader with this scope."""
    return (
        (scope.owner is None or notice.owner == scope.owner)
        and (scope.task_id is None or notice.task_id == scope.task_id)
        and (not scope.types or notice.type in scope.types)
        and scope.may_see(notice.type, notice.owner)
    )


@dataclass(frozen=True)
class Page:
    items: list[EventPublic]
    cursors: list[str]  # each item's own position
    next_cursor: str | None
    has_more: bool
    horizon: int | None  # transactions from this id on were not looked at (PostgreSQL)


async def read_page(
    engine: AsyncEngine,
    scope: EventScope,
    *,
    after: tuple[int, int] | None,
    limit: int,
    base: str,
) -> Page:
    """Up to `limit` events after the cursor, image URLs made absolute on `base`.

    On PostgreSQL only events of ended transactions are served: one still
    running may hold an earlier place in the log, and a cursor must never pass it.
    """
    async with engine.connect() as db:
        below = await repository.horizon(db)
        # Read before the page (SQLite reads each statement afresh): when the page is not
        # full, every match up to here was served, and the next read may start here
        # rather than scan again the events this one skipped (other owners', types).
        end = await repository.newest_position(db, below_txid=below)
        rows = await repository.read_events(
            db, scope, after=after, limit=limit + 1, below_txid=below
        )
        await db.rollback()
    served = rows[:limit]
    items = [
        EventPublic(
            id=row.id,
            type=row.type,
            created_at=row.created_at,
            data=absolute_urls(row.data, base),
        )
        for row in served
    ]
    cursors = [encode_cursor(row.txid, row.seq) for row in served]
    positions = [(row.txid, row.seq) for row in served]
    if len(rows) > limit:
        end = None
    last_position = max([*positions, *(p for p in (after, end) if p is not None)], default=None)
    last = encode_cursor(*last_position) if last_position is not None else None
    return Page(items, cursors, last, len(rows) > limit, below)
