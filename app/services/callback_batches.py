"""Terminal callbacks that arrive together are decided together (PostgreSQL).

Under load many callbacks wait on the database at once. Instead of one pooled
connection and its statements each, they queue here and a few batches run at
a time: while a batch is out, new arrivals gather into the next. A lone
callback goes out at once, so batching adds no wait when the service is quiet.
With confirmation on, a batch is one `repository.confirm_in_batch` round trip
(`ConfirmationBatches`); with it off, one transaction of
`snapshot_batches.apply_batch` (`SnapshotBatches`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Protocol, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics, repository
from app.db import statement_commits
from app.models import utcnow
from app.repository import OneStatement, TerminalCallback
from app.services.snapshot_batches import BatchDecision, SnapshotCallback, apply_batch

log = structlog.get_logger(__name__)

MAX_BATCH = 64
BATCHES_IN_FLIGHT = 2
FAILURE_LOG_SECONDS = 60.0


class _AboutTask(Protocol):
    @property
    def task_id(self) -> str: ...


CallbackT = TypeVar("CallbackT", bound=_AboutTask)
AnswerT = TypeVar("AnswerT")


@dataclass
class _Waiting(Generic[CallbackT, AnswerT]):
    callback: CallbackT
    arrival: int  # its place in the order callbacks were queued
    answer: asyncio.Future[AnswerT | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Batches(Generic[CallbackT, AnswerT]):
    """Decide callbacks in batches of distinct tasks, a few batches at a time;
    `_run` decides one batch."""

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
        # Each task's callbacks, oldest first; and each waiting task once, by the
        # arrival of its oldest callback: a batch takes from the front of that order
        # without looking at the repeats that wait behind (thousands, for one task).
        self._by_task: dict[str, deque[_Waiting[CallbackT, AnswerT]]] = {}
        self._oldest: list[tuple[int, str]] = []  # a heap of (arrival, task id)
        self._arrivals = itertools.count()
        self._drainers: set[asyncio.Task[None]] = set()
        self._said_at = -FAILURE_LOG_SECONDS
        self._failures_unsaid = 0

    async def decide(self, callback: CallbackT) -> AnswerT | None:
        """What the batch did for this callback; None when its batch failed
        (a deadlock, a lost connection): nothing was written, the general path decides."""
        waiting: _Waiting[CallbackT, AnswerT] = _Waiting(callback, next(self._arrivals))
        task_id = callback.task_id
        queued = self._by_task.get(task_id)
        if queued is None:
            self._by_task[task_id] = deque([waiting])
            heapq.heappush(self._oldest, (waiting.arrival, task_id))
        else:
            queued.append(waiting)
        if len(self._drainers) < self.in_flight:
            drainer = asyncio.create_task(self._drain())
            self._drainers.add(drainer)
            drainer.add_done_callback(self._drainers.discard)
        return await waiting.answer

    @property
    def queued(self) -> int:
        """How many callbacks wait for a batch."""
        return sum(len(queued) for queued in self._by_task.values())

    def _take(self) -> list[_Waiting[CallbackT, AnswerT]]:
        """The next batch: the oldest callbacks, one per task (a statement can change a
        row once); a second callback about the same task waits for a later batch.
        Its cost grows with the batch (and the log of the tasks waiting), never with
        the repeats waiting behind."""
        taken: list[str] = []
        while self._oldest and len(taken) < self.max_batch:
            taken.append(heapq.heappop(self._oldest)[1])
        batch = [self._by_task[task_id].popleft() for task_id in taken]
        # A task with repeats waits again, placed by the arrival of its next callback.
        for task_id in taken:
            queued = self._by_task[task_id]
            if queued:
                heapq.heappush(self._oldest, (queued[0].arrival, task_id))
            else:
                del self._by_task[task_id]
        return batch

    async def _drain(self) -> None:
        try:
            while self._oldest:
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

    async def _run(self, callbacks: list[CallbackT], now: datetime) -> dict[str, AnswerT]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Let the batches out finish (their callbacks are being answered)."""
        if self._drainers:
            await asyncio.gather(*self._drainers, return_exceptions=True)


class ConfirmationBatches(_Batches[TerminalCallback, OneStatement]):
    """Confirmation on: each batch is one statement that queues the confirmations."""

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


class SnapshotBatches(_Batches[SnapshotCallback, BatchDecision]):
    """Confirmation off: each batch applies its callbacks in one transaction."""

    async def _run(
        self, callbacks: list[SnapshotCallback], now: datetime
    ) -> dict[str, BatchDecision]:
        async with self.engine.connect() as db:
            try:
                async with db.begin():
                    return await apply_batch(db, callbacks, now=now)
            except BaseException:
                await db.invalidate()  # as above: a fresh connection for the next one
                raise
