"""Wake-ups: tell waiters in this process that an event committed.

On PostgreSQL the events table's trigger sends a NOTIFY at commit and one
listening connection per process hears every process's changes. On SQLite
(one process) the writer queues a notice on its connection and it is published
once the connection is back in the pool, after its commit. A wake-up only says
"look again": readers re-read the database, so a lost wake-up costs latency,
never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.outage import UNREACHABLE, OutageLog

log = structlog.get_logger(__name__)

CHANNEL = "imagetasks_events"
_PENDING = "imagetasks.events.pending"  # written in the open transaction
_COMMITTED = "imagetasks.events.committed"  # committed, to publish once the connection is back
_HOOKED: weakref.WeakSet[Engine] = weakref.WeakSet()
MAX_RECONNECT_SECONDS = 10.0
HEARTBEAT_SECONDS = 15.0


@dataclass(frozen=True)
class Notice:
    """One committed event, as much as a waiter needs to decide whether to look."""

    type: str
    task_id: str
    owner: str
    txid: int | None = None  # the writing transaction (PostgreSQL)

    @classmethod
    def parse(cls, payload: str) -> Notice | None:
        """A NOTIFY payload: `txid type task_id owner`."""
        parts = payload.split(" ")
        if len(parts) != 4 or not parts[0].isdigit():
            return None
        return cls(parts[1], parts[2], parts[3], int(parts[0]))


def queue_after_commit(db: AsyncConnection, notice: Notice) -> None:
    """Publish `notice` in this process once the transaction commits (SQLite only)."""
    if db.sync_engine in _HOOKED:
        db.info.setdefault(_PENDING, []).append(notice)


class Subscription:
    """One waiter's doorbell: rings for the notices its filter accepts."""

    def __init__(self, match: Callable[[Notice], bool]) -> None:
        self.match = match
        self.latest_txid: int | None = None  # the newest transaction that rang
        self._rung = asyncio.Event()

    def ring(self, notice: Notice | None) -> None:
        if notice is not None and notice.txid is not None:
            self.latest_txid = max(self.latest_txid or 0, notice.txid)
        self._rung.set()

    async def wait(self, seconds: float) -> bool:
        """Until rung or `seconds` pass; True when rung (the bell is reset)."""
        if seconds <= 0:
            await asyncio.sleep(0)
        elif not self._rung.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rung.wait(), seconds)
        rung = self._rung.is_set()
        self._rung.clear()
        return rung


class EventBus:
    """The process's fan-out of event notices to its waiters."""

    def __init__(self, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.heartbeat_seconds = heartbeat_seconds  # how often idle streams send a comment
        self._subscriptions: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # PostgreSQL: the LISTEN connection is up
        self.closing = asyncio.Event()  # the process is stopping: streams end

    @contextlib.contextmanager
    def subscribe(self, match: Callable[[Notice], bool]) -> Iterator[Subscription]:
        """A subscription for the duration of the block (subscribe before reading)."""
        subscription = Subscription(match)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def publish(self, notice: Notice) -> None:
        """Ring every subscription that wants this notice."""
        for subscription in list(self._subscriptions):
            if subscription.match(notice):
                subscription.ring(notice)

    def ring_all(self) -> None:
        """Make everyone look again (after a reconnect, or when stopping)."""
        for subscription in list(self._subscriptions):
            subscription.ring(None)

    def shut_down(self) -> None:
        """Tell streams to end and waiters to answer now (safe from a signal handler)."""

        def stop() -> None:
            self.closing.set()
            self.ring_all()

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(stop)
        else:
            stop()

    async def start(self, engine: AsyncEngine) -> None:
        """Listen on PostgreSQL, or hook SQLite's commits (idempotent)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if engine.dialect.name == "postgresql":
            dsn = make_url(str(engine.url.render_as_string(hide_password=False)))
            dsn = dsn.set(drivername="postgresql")
            self._listener = asyncio.create_task(
                self._listen_forever(dsn.render_as_string(hide_password=False))
            )
        else:
            self._hook_commits(engine.sync_engine)

    async def aclose(self) -> None:
        """Stop listening; wake everyone so nobody waits on a closed bus."""
        self.closing.set()
        self.ring_all()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    def _hook_commits(self, engine: Engine) -> None:
        loop = self._loop
        assert loop is not None

        def on_commit(connection: Connection) -> None:
            pending = connection.info.pop(_PENDING, None)
            if pending:
                connection.info.setdefault(_COMMITTED, []).extend(pending)

        def on_rollback(connection: Connection) -> None:
            connection.info.pop(_PENDING, None)

        def on_checkin(_dbapi_connection: Any, record: Any) -> None:
            # The commit has finished by now: a woken reader sees its rows.
            committed = record.info.pop(_COMMITTED, None) if record is not None else None
            for notice in committed or ():
                loop.call_soon_threadsafe(self.publish, notice)

        event.listen(engine, "commit", on_commit)
        event.listen(engine, "rollback", on_rollback)
        event.listen(engine, "checkin", on_checkin)
        _HOOKED.add(engine)

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        notice = Notice.parse(payload)
        if notice is not None:
            self.publish(notice)

    async def _listen_forever(self, dsn: str) -> None:
        # Refused reconnections are one story (started, a summary now and then, ended),
        # not a line per attempt for as long as the database is away.
        # A LISTEN connection made is a recovery for certain: no settling period.
        outage = OutageLog("event_listener", settle_seconds=0)
        delay = 0.5
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(dsn)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                delay = 0.5
                outage.recovered()
                self.ring_all()  # anything committed while we were away: look again
                log.info("event_listener_connected")
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outage.failed(UNREACHABLE, repr(exc)[:200])
            finally:
                self.listening.clear()
                if connection is not None:
                    # Nothing to flush on a listening connection: drop it without a round trip.
                    connection.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_SECONDS)
