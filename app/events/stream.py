"""Server-Sent Events: the log as it grows, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from app.events.bus import EventBus
from app.events.feed import matches, read_page
from app.events.repository import EventScope
from app.events.schemas import EventPublic

PAGE = 100
RETRY_MILLISECONDS = 2000
# A change was announced but an older transaction still runs (PostgreSQL serves an event
# only once every transaction older than it has ended): look again soon, then less often.
RECHECK_FIRST_SECONDS = 0.05
RECHECK_MAX_SECONDS = 0.5


def sse_frame(cursor: str, event: EventPublic) -> str:
    """One event as an SSE message: id is the resume cursor, event the type."""
    data = json.dumps(event.model_dump(mode="json"), separators=(",", ":"))
    return f"id: {cursor}\nevent: {event.type}\ndata: {data}\n\n"


async def event_stream(
    engine: AsyncEngine,
    bus: EventBus,
    scope: EventScope,
    *,
    after: tuple[int, int] | None,
    base: str,
    heartbeat_seconds: float,
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[str]:
    """Every event in scope after the cursor, then each new one as it commits.

    A comment line every `heartbeat_seconds` keeps proxies from closing an idle
    stream; the stream ends when the process stops, or when `still_allowed` (asked
    before each page and heartbeat) says the reader's right to it has ended.
    """
    loop = asyncio.get_running_loop()
    with bus.subscribe(lambda notice: matches(scope, notice)) as bell:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        last_sent = loop.time()
        recheck = RECHECK_FIRST_SECONDS
        while not bus.closing.is_set():
            if still_allowed is not None and not await still_allowed():
                return
            page = await read_page(engine, scope, after=after, limit=PAGE, base=base)
            for cursor, event in zip(page.cursors, page.items, strict=True):
                yield sse_frame(cursor, event)
                last_sent = loop.time()
            if page.next_cursor is not None:
                after = _position(page.next_cursor)
            if page.has_more:
                continue
            held_back = (
                page.horizon is not None
                and bell.latest_txid is not None
                and bell.latest_txid >= page.horizon
            )
            until_heartbeat = max(0.0, last_sent + heartbeat_seconds - loop.time())
            if held_back:
                timeout = min(recheck, until_heartbeat)
                recheck = min(recheck * 2, RECHECK_MAX_SECONDS)
            else:
                timeout, recheck = until_heartbeat, RECHECK_FIRST_SECONDS
            if not await bell.wait(timeout) and loop.time() - last_sent >= heartbeat_seconds:
                if still_allowed is not None and not await still_allowed():
                    return
                yield ": heartbeat\n\n"
                last_sent = loop.time()


def _position(cursor: str) -> tuple[int, int]:
    txid, seq = cursor.split(".")
    return int(txid), int(seq)
