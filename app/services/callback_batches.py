"""Terminal callbacks that arrive together are decided by one statement (PostgreSQL).

Under load many callbacks wait on the database at once. Instead of one
statement and one pooled connection each, they queue here and a few batches
run at a time, each one `repository.confirm_in_batch` round trip: while a
batch is out, new arrivals gather into the next. A lone callback goes out at
once, so batching adds no wait when the service is quiet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics, repository
from app.db import statement_commits
from app.models import utcnow
from app.repository import OneStatement, TerminalCallback

log = structlog.get_logger(__name__)

MAX_BATCH = 64
BATCHES_IN_FLIGHT = 2
FAILURE_LOG_SECONDS = 60.0


@dataclass
class _Waiting:
    callback: TerminalCallback
    answer: asyncio.Future[OneStatement | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ConfirmationBatches:
    """Decide terminal callbacks in batches of distinct tasks, a few batches at a time."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = MAX_BATCH,
        in_flight: int = BATCHES_IN_FLIGHT,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._queue: list[_Waiting] = []
        self._drainers: set[asyncio.Task[None]] = set()
        self._said_at = -FAILURE_LOG_SECONDS
        self._failures_unsaid = 0

    async def decide(self, callback: TerminalCallback) -> OneStatement | None:
        """What the batch statement did for this callback; None when its batch failed
        (a deadlock, a lost connection): nothing was written, the general path decides."""
        waiting = _Waiting(callback)
        self._queue.append(waiting)
        if len(self._drainers) < self.in_flight:
            drainer = asyncio.create_task(self._drain())
            self._drainers.add(drainer)
            drainer.add_done_callback(self._drainers.discard)
        return await waiting.answer

    def _take(self) -> list[_Waiting]:
        """The next batch: the oldest callbacks, one per task (a statement can change a
        row once); a second callback about the same task waits for a later batch."""
        batch: list[_Waiting] = []
        seen: set[str] = set()
        rest: list[_Waiting] = []
        for waiting in self._queue:
            task_id = waiting.callback.task_id
            if len(batch) < self.max_batch and task_id not in seen:
                seen.add(task_id)
                batch.append(waiting)
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                try:
                    decided = await self._run([w.callback for w in batch], utcnow())
                except asyncio.CancelledError:
                    for waiting in batch:
                        waiting.answer.cancel()
                    raise
                except Exception as exc:  # the general path retries each and reports what fails
                    self._failed(exc, len(batch))
                    decided = {}
                for waiting in batch:
                    if not waiting.answer.done():  # its request may have been cancelled
                        waiting.answer.set_result(decided.get(waiting.callback.task_id))
        finally:
            # Counted out in the same step as the empty queue was seen: a done callback
            # runs a turn later, and a callback queued in between would find every
            # drainer slot taken by drainers that have ended, and wait forever.
            self._drainers.discard(asyncio.current_task())

    def _failed(self, exc: Exception, size: int) -> None:
        """Counted, and said at most once a minute: a deadlock now and then is harmless,
        a statement that always fails would slow every callback unseen."""
        metrics.CALLBACK_BATCHES_FAILED.inc()
        self._failures_unsaid += 1
        now = time.monotonic()
        if now - self._said_at >= FAILURE_LOG_SECONDS:
            log.warning(
                "callback_batches_failed",
                batches=self._failures_unsaid,
                size=size,
                error=type(exc).__name__,
            )
            self._said_at, self._failures_unsaid = now, 0

    async def _run(
        self, callbacks: list[TerminalCallback], now: datetime
    ) -> dict[str, OneStatement]:
        # Autocommit: the statement commits alone, no BEGIN and COMMIT round trips.
        async with statement_commits(self.engine) as db:
            try:
                return await repository.confirm_in_batch(db, callbacks, now)
            except BaseException:
                # Whatever failed it (a deadlock, a cancelled wait), the connection
                # does not go back for the next request: a new one costs little.
                await db.invalidate()
                raise

    async def aclose(self) -> None:
        """Let the batches out finish (their callbacks are being answered)."""
        if self._drainers:
            await asyncio.gather(*self._drainers, return_exceptions=True)
