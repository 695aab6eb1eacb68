"""The reconciler: ask the query API about tasks that have been quiet too long,
and confirm terminal callbacks. A lost callback loses nothing.

Polls go in batches: one statement leases a batch of due tasks, the provider is
asked about them concurrently (bounded), and the answers are applied through the
state machine in one transaction per batch.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from app import activity, metrics, repository
from app.config import Settings
from app.db import SessionFactory
from app.models import Task, TaskStatus, utcnow
from app.repository import PollClaim
from app.schemas import Snapshot
from app.services import events
from app.services.snapshots import Applied, apply_snapshot
from app.upstream import LINK_LIFETIME, StarMagicClient, UpstreamError, UpstreamNotFound

log = structlog.get_logger(__name__)

POLL_LEASE = timedelta(seconds=60)
MAX_POLL_INTERVAL = timedelta(minutes=15)
# However many callbacks arrive, a task is not queried again sooner than this.
QUERY_SPACING = timedelta(seconds=5)
NOT_FOUND_LIMIT = 3
BATCH = 20
# Confirmations claimed at once by the worker's loop, and provider queries in flight.
CONFIRM_BATCH = 64
CONCURRENCY = 16
IDLE_WAIT_SECONDS = 15
NO_OUTCOME = ("no_outcome", "StarMagic gave no outcome within 24 hours")


# An activity row for the timeline: (outcome, detail).
Note = tuple[str, str]


async def _note(db: AsyncConnection, task_id: str, note: Note, now: datetime) -> None:
    await activity.note(db, task_id, activity.Kind.QUERY, note[0], at=now, detail=note[1])


def _why(task: PollClaim) -> str:
    """What a query is for, as the timeline says it."""
    return "confirmation" if task.confirm_requested_at is not None else "poll"


def poll_backoff(settings: Settings, attempts: int) -> timedelta:
    """Per-task backoff: the quiet limit, doubling, capped, with jitter."""
    base = settings.reconcile_after_seconds * 2 ** min(attempts, 10)
    seconds = min(base, MAX_POLL_INTERVAL.total_seconds())
    return timedelta(seconds=seconds * random.uniform(0.9, 1.1))


class Reconciler:
    """Polls due tasks; `confirm_soon` gives one task its turn right away."""

    def __init__(
        self,
        factory: SessionFactory,
        client: StarMagicClient,
        settings: Settings,
        *,
        query_spacing: timedelta = QUERY_SPACING,
    ):
        self._factory = factory
        self._client = client
        self._settings = settings
        self.query_spacing = query_spacing
        self._running: set[asyncio.Task[None]] = set()
        self._later: dict[str, asyncio.TimerHandle] = {}
        self._slots = asyncio.Semaphore(CONCURRENCY)

    async def run_once(self) -> int:
        """Claim one batch of due tasks and poll them; the number polled."""
        return await self._claim_and_poll(BATCH, confirmations_only=False)

    async def confirm_due(self) -> int:
        """Claim one batch of due confirmations and poll them; the number polled."""
        return await self._claim_and_poll(CONFIRM_BATCH, confirmations_only=True)

    async def _claim_and_poll(self, limit: int, *, confirmations_only: bool) -> int:
        now = utcnow()
        async with self._factory() as session, session.begin():
            claims = await repository.claim_due_polls(
                await session.connection(),
                now=now,
                lease=POLL_LEASE,
                spacing=self.query_spacing,
                limit=limit,
                confirmations_only=confirmations_only,
            )
        await self._poll_all(claims)
        return len(claims)

    async def _poll_all(self, claims: Sequence[PollClaim]) -> None:
        """Ask about every claim concurrently (bounded), then apply the answers together."""

        async def ask(claim: PollClaim) -> tuple[PollClaim, Snapshot | None]:
            async with self._slots:
                return claim, await self._ask(claim)

        answers = await asyncio.gather(*(ask(claim) for claim in claims))
        await self._apply_answers([(c, s) for c, s in answers if s is not None])

    def confirm_soon(self, task_id: str) -> None:
        """Confirm a terminal callback off the request path (the row stays due if we die)."""
        job = asyncio.create_task(self._confirm(task_id))
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    def confirm_later(self, task_id: str, delay: timedelta) -> None:
        """`confirm_soon` once the query spacing allows; one timer per task."""
        if task_id in self._later:
            return
        loop = asyncio.get_running_loop()
        seconds = max(delay.total_seconds(), 0.0)
        self._later[task_id] = loop.call_later(seconds, self._confirm_now, task_id)

    def _confirm_now(self, task_id: str) -> None:
        del self._later[task_id]
        self.confirm_soon(task_id)

    async def _confirm(self, task_id: str) -> None:
        now = utcnow()
        try:
            # Only while still due, not leased and not asked too recently; a request
            # held back by the spacing alone is tried again once the spacing allows.
            async with self._factory() as session, session.begin():
                claim = await repository.claim_poll(
                    await session.connection(),
                    task_id,
                    now=now,
                    lease=POLL_LEASE,
                    spacing=self.query_spacing,
                )
                waiting = None if claim else await repository.get_task(session, task_id)
            if claim is not None:
                await self.poll(claim)
            elif waiting is not None and (delay := self._spacing_left(waiting, now)):
                self.confirm_later(task_id, delay)
        except Exception:
            log.exception("confirm_failed", task_id=task_id)

    def _spacing_left(self, task: Task, now: datetime) -> timedelta | None:
        """How long a waiting request is held back only by the spacing; None otherwise.

        A live lease is not waited for: the poll holding it sees the request when it ends.
        """
        if task.confirm_requested_at is None or TaskStatus(task.status).terminal:
            return None
        if task.poll_lease_until is not None and task.poll_lease_until >= now:
            return None
        if task.poll_claimed_at is None:
            return None
        left = task.poll_claimed_at + self.query_spacing - now
        return left if left > timedelta(0) else None

    async def wait_idle(self) -> None:
        """Wait for the confirmations started so far (they are short and bounded)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=IDLE_WAIT_SECONDS)

    async def aclose(self) -> None:
        """Drop the timers (those rows stay due), let in-flight confirmations finish."""
        for timer in self._later.values():
            timer.cancel()
        self._later.clear()
        await self.wait_idle()

    async def poll(self, claim: PollClaim) -> None:
        """Ask the provider about one leased task and apply what it says."""
        await self._poll_all([claim])

    async def _ask(self, task: PollClaim) -> Snapshot | None:
        """The provider's snapshot of one leased task; None when there is none to apply
        (the lease is then already settled: rescheduled or given up)."""
        now = utcnow()
        if task.upstream_task_id is None:
            await self._settle_unsubmitted(task, now)
            return None
        why = _why(task)
        try:
            snapshot = await self._client.query(task.upstream_task_id)
        except UpstreamNotFound as exc:
            metrics.RECONCILER_QUERIES.labels(outcome="not_found").inc()
            note = ("not_found", f"{why}: {exc.message}")
            if self._last_chance(task, now) or task.poll_attempts + 1 >= NOT_FOUND_LIMIT:
                await self._give_up(task, "upstream_not_found", exc.message, now, note=note)
            else:
                await self._reschedule(task, now, note=note)
            return None
        except UpstreamError as exc:
            metrics.RECONCILER_QUERIES.labels(outcome="error").inc()
            log.warning("poll_failed", task_id=task.id, reason=exc.message)
            note = ("error", f"{why}: {exc.message}")
            if self._last_chance(task, now):
                await self._give_up(task, *NO_OUTCOME, now, note=note)
            else:
                await self._reschedule(task, now, note=note)
            return None
        metrics.RECONCILER_QUERIES.labels(outcome="ok").inc()
        return snapshot

    @staticmethod
    def _last_chance(task: PollClaim, now: datetime) -> bool:
        """Past any link's lifetime: one last question, then no more waiting."""
        return now - task.created_at > LINK_LIFETIME

    async def _apply_answers(self, answers: Sequence[tuple[PollClaim, Snapshot]]) -> None:
        """Apply the provider's answers and release the leases, one transaction for all.

        Should the batch fail as a whole, each answer is tried in a transaction of its own.
        """
        if not answers:
            return
        now = utcnow()
        try:
            async with self._factory() as session, session.begin():
                db = await session.connection()
                applied = [
                    await self._apply_one(db, task, snapshot, now) for task, snapshot in answers
                ]
        except Exception:
            if len(answers) == 1:
                raise
            log.warning("poll_batch_failed", tasks=len(answers), exc_info=True)
            for answer in answers:
                try:
                    await self._apply_answers([answer])
                except Exception:
                    # Its lease runs out and it is due again: asked later, not lost.
                    log.exception("poll_apply_failed", task_id=answer[0].id)
            return
        for (task, snapshot), (result, waiting) in zip(answers, applied, strict=True):
            log.info(
                "task_polled",
                task_id=task.id,
                upstream_task_id=task.upstream_task_id,
                reported=snapshot.status.value,
                outcome=result.outcome.value,
            )
            if result.state.status.terminal:
                continue
            if self._last_chance(task, now):
                await self._give_up(task, *NO_OUTCOME, now)
            elif waiting:
                self.confirm_later(task.id, task.poll_claimed_at + self.query_spacing - now)

    async def _apply_one(
        self, db: AsyncConnection, task: PollClaim, snapshot: Snapshot, now: datetime
    ) -> tuple[Applied, bool]:
        """One answer through the state machine; a task still active gets its next poll
        (True when a callback asked again meanwhile)."""
        applied = await apply_snapshot(
            db,
            task.id,
            snapshot,
            now=now,
            poll_after=poll_backoff(self._settings, task.poll_attempts),
        )
        detail = f"{_why(task)}: StarMagic says {snapshot.status.value} ({applied.outcome.value})"
        await activity.note(db, task.id, activity.Kind.QUERY, "ok", at=now, detail=detail)
        if applied.state.status.terminal or self._last_chance(task, now):
            return applied, False
        waiting = await repository.finish_poll(
            db,
            task.id,
            claimed_at=task.poll_claimed_at,
            next_poll_at=now + poll_backoff(self._settings, task.poll_attempts),
            values={"poll_attempts": task.poll_attempts + 1},
        )
        return applied, waiting

    async def _reschedule(
        self, task: PollClaim, now: datetime, *, note: Note | None = None
    ) -> None:
        await self._finish(
            task,
            now,
            next_poll_at=now + poll_backoff(self._settings, task.poll_attempts),
            values={"poll_attempts": task.poll_attempts + 1},
            note=note,
        )

    async def _finish(
        self,
        task: PollClaim,
        now: datetime,
        *,
        next_poll_at: datetime,
        values: dict[str, Any],
        note: Note | None = None,
    ) -> None:
        """Release the lease; a callback that asked meanwhile gets its query after the spacing."""
        async with self._factory() as session, session.begin():
            waiting = await repository.finish_poll(
                await session.connection(),
                task.id,
                claimed_at=task.poll_claimed_at,
                next_poll_at=next_poll_at,
                values=values,
            )
            if note is not None:
                await _note(await session.connection(), task.id, note, now)
        if waiting:
            self.confirm_later(task.id, task.poll_claimed_at + self.query_spacing - now)

    async def _settle_unsubmitted(self, task: PollClaim, now: datetime) -> None:
        deadline = task.created_at + timedelta(seconds=self._settings.submit_unknown_after_seconds)
        if now < deadline:
            await self._finish(task, now, next_poll_at=deadline, values={})
            return
        await self._give_up(
            task,
            "submission_outcome_unknown",
            "the submission's outcome was never learned and no callback arrived",
            now,
        )

    async def _give_up(
        self,
        task: PollClaim,
        code: str,
        message: str,
        now: datetime,
        *,
        note: Note | None = None,
    ) -> None:
        values = {
            "status": TaskStatus.FAILED.value,
            "error_code": code,
            "error_message": message,
            "completed_at": now,
            "updated_at": now,
            "next_poll_at": None,
            "poll_lease_until": None,
            "confirm_requested_at": None,
        }
        # Not while a callback's news is newer than this poll: ask once more first.
        condition = repository.no_confirmation_asked_since(task.poll_claimed_at)
        async with self._factory() as session, session.begin():
            db = await session.connection()
            failed = await repository.update_returning(db, task.id, condition, values)
            if failed is not None:
                await events.record(db, events.EventType.TASK_FAILED, failed, [], now=now)
                if note is not None:
                    await _note(db, task.id, note, now)
        if failed is not None:
            log.warning("task_given_up", task_id=task.id, code=code, reason=message)
        else:
            await self._reschedule(task, now, note=note)
