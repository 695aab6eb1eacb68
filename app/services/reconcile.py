"""The reconciler: ask the query API about tasks that have been quiet too long,
and confirm terminal callbacks. A lost callback loses nothing.

Polls go in batches: one statement leases a batch of due tasks, the provider is
asked about them concurrently (bounded), and each answer is applied through the
state machine as it arrives (those that arrive together in one transaction).
Each query has a deadline well inside the lease, so a slow answer holds back
only its own task, and the worker starts the next batch while it is out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_
from sqlalchemy.ext.asyncio import AsyncConnection

from app import activity, metrics, repository
from app.config import Settings
from app.db import SessionFactory
from app.models import Task, TaskStatus, utcnow
from app.repository import PollClaim
from app.schemas import Snapshot
from app.services import events, snapshot_batches
from app.services.snapshots import Applied, Outcome, apply_snapshot, log_transition
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
# Claims of the worker's confirmation loop out at once, slow ones included.
CONFIRMS_IN_FLIGHT = 4 * CONFIRM_BATCH
# From its claim, a poll's wait for a slot and its query end within this (inside
# the lease), so its answer is applied before anyone else may claim the task.
QUERY_DEADLINE = POLL_LEASE / 2
IDLE_WAIT_SECONDS = 15
NO_OUTCOME = ("no_outcome", "StarMagic gave no outcome within 24 hours")


# An activity row for the timeline: (outcome, detail).
Note = tuple[str, str]


async def _note(db: AsyncConnection, task_id: str, note: Note, now: datetime) -> None:
    await activity.note(db, task_id, activity.Kind.QUERY, note[0], at=now, detail=note[1])


def _why(task: PollClaim) -> str:
    """What a query is for, as the timeline says it."""
    return "confirmation" if task.confirm_requested_at is not None else "poll"


class _SlotTimeout(Exception):
    """The deadline passed before a query slot was free: nothing was asked."""


def _answered(task: PollClaim, snapshot: Snapshot, outcome: Outcome) -> str:
    """The timeline's detail for an answered query."""
    return f"{_why(task)}: StarMagic says {snapshot.status.value} ({outcome.value})"


def _usual(answers: Sequence[tuple[PollClaim, Snapshot]]) -> list[tuple[PollClaim, Snapshot]]:
    """The answers the batch's statements take: terminal, about the provider task the
    task carries; a task's first answer only (the statements take distinct tasks)."""
    firsts: dict[str, tuple[PollClaim, Snapshot]] = {}
    for task, snapshot in answers:
        firsts.setdefault(task.id, (task, snapshot))
    return [
        (task, snapshot)
        for task, snapshot in firsts.values()
        if snapshot.status.terminal
        and snapshot.upstream_id
        and snapshot.upstream_id == task.upstream_task_id
    ]


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
        query_deadline: timedelta = QUERY_DEADLINE,
    ):
        self._factory = factory
        self._client = client
        self._settings = settings
        self.query_spacing = query_spacing
        self.query_deadline = query_deadline
        self._in_flight = 0  # confirmation claims the worker's loop has out
        # Whether the confirmation loop's last look found more due than it could take:
        # the worker then puts downloads and renders after confirmations.
        self.behind = False
        self._running: set[asyncio.Task[None]] = set()
        self._later: dict[str, asyncio.TimerHandle] = {}
        self._slots = asyncio.Semaphore(CONCURRENCY)

    async def run_once(self) -> int:
        """Claim one batch of due tasks and poll them; the number polled."""
        return await self._claim_and_poll(BATCH, confirmations_only=False)

    async def confirm_due(self) -> int:
        """Claim one batch of due confirmations and poll them; the number polled."""
        return await self._claim_and_poll(CONFIRM_BATCH, confirmations_only=True)

    async def start_confirmations(self, stopped: Callable[[], bool] = lambda: False) -> int:
        """Claim due confirmations as room allows and poll them in the background;
        the number claimed. A slow query holds only its own claim, not the next batch.
        Claimed as the caller `stopped`, they start no query: their leases run out and
        the tasks are due again."""
        room = min(CONFIRM_BATCH, CONFIRMS_IN_FLIGHT - self._in_flight)
        if room <= 0:
            # Every query is out: the last claim's finding stands (a slow provider is
            # waited on over the network, which takes no CPU from the downloads).
            return 0
        try:
            claims = await self._claim(room, confirmations_only=True)
        except Exception:
            # A loop whose claims fail runs no confirmation: downloads and renders must
            # not give way to it for as long as it fails.
            self.behind = False
            raise
        self.behind = len(claims) == room
        if claims and not stopped():
            self._in_flight += len(claims)
            self._background(self._poll_all(claims, counted=True), "confirm_batch_failed")
        return len(claims)

    async def _claim_and_poll(self, limit: int, *, confirmations_only: bool) -> int:
        claims = await self._claim(limit, confirmations_only=confirmations_only)
        await self._poll_all(claims)
        return len(claims)

    async def _claim(self, limit: int, *, confirmations_only: bool) -> list[PollClaim]:
        async with self._factory() as session, session.begin():
            return await repository.claim_due_polls(
                await session.connection(),
                now=utcnow(),
                lease=POLL_LEASE,
                spacing=self.query_spacing,
                limit=limit,
                confirmations_only=confirmations_only,
            )

    def _background(self, job: Coroutine[Any, Any, None], event: str) -> None:
        async def logged() -> None:
            try:
                await job
            except Exception:
                log.exception(event)

        task = asyncio.create_task(logged())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _poll_all(self, claims: Sequence[PollClaim], *, counted: bool = False) -> None:
        """Ask about every claim concurrently (bounded); apply each answer as it arrives,
        those that arrive together in one transaction. One claim's failure is its own."""
        pending = {asyncio.create_task(self._ask_alone(claim)) for claim in claims}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answers = [answer for job in done if (answer := job.result()) is not None]
                try:
                    await self._apply_answers(answers)
                finally:
                    if counted:
                        self._in_flight -= len(done)
        finally:
            for job in pending:
                job.cancel()
            if counted:
                self._in_flight -= len(pending)

    async def _ask_alone(self, claim: PollClaim) -> tuple[PollClaim, Snapshot] | None:
        """`_ask`, with an unexpected failure kept to this claim: logged, its lease released."""
        try:
            snapshot = await self._ask(claim)
        except Exception:
            log.exception("poll_failed_unexpectedly", task_id=claim.id)
            try:
                async with self._factory() as session, session.begin():
                    await repository.release_poll(
                        await session.connection(), claim.id, claimed_at=claim.poll_claimed_at
                    )
            except Exception:
                log.exception("poll_release_failed", task_id=claim.id)  # its lease runs out
            return None
        return None if snapshot is None else (claim, snapshot)

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

    def under_way(self) -> list[asyncio.Task[None]]:
        """The confirmations and polls running in the background now."""
        return list(self._running)

    async def aclose(self) -> None:
        """Drop the timers (those rows stay due), let in-flight confirmations finish;
        stop those still out after a while (their leases run out, the rows stay due)."""
        for timer in self._later.values():
            timer.cancel()
        self._later.clear()
        await self.wait_idle()
        for job in set(self._running):
            job.cancel()
        if self._running:
            await asyncio.wait(set(self._running))

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
            snapshot = await self._query(task, task.upstream_task_id)
        except _SlotTimeout:
            # Never asked: the task stays due, its confirmation request kept.
            await self._release(task)
            return None
        except UpstreamNotFound as exc:
            metrics.RECONCILER_QUERIES.labels(outcome="not_found").inc()
            note = ("not_found", f"{why}: {exc.message}")
            if self._last_chance(task, now) or task.poll_attempts + 1 >= NOT_FOUND_LIMIT:
                await self._give_up(task, "upstream_not_found", exc.message, now, note=note)
            else:
                await self._reschedule(task, now, note=note)
            return None
        except (UpstreamError, TimeoutError) as exc:
            metrics.RECONCILER_QUERIES.labels(outcome="error").inc()
            reason = exc.message if isinstance(exc, UpstreamError) else "no answer in time"
            log.warning("poll_failed", task_id=task.id, reason=reason)
            note = ("error", f"{why}: {reason}")
            if self._last_chance(task, now):
                await self._give_up(task, *NO_OUTCOME, now, note=note)
            else:
                await self._reschedule(task, now, note=note)
            return None
        metrics.RECONCILER_QUERIES.labels(outcome="ok").inc()
        return snapshot

    async def _query(self, task: PollClaim, upstream_id: str) -> Snapshot:
        """The provider's answer, within the claim's deadline (slot wait included)."""
        deadline = task.poll_claimed_at + self.query_deadline
        asked = False
        try:
            async with asyncio.timeout(max((deadline - utcnow()).total_seconds(), 0.0)):
                async with self._slots:
                    asked = True
                    return await self._client.query(upstream_id)
        except TimeoutError:
            if not asked:
                raise _SlotTimeout from None
            raise

    async def _release(self, task: PollClaim) -> None:
        async with self._factory() as session, session.begin():
            await repository.release_poll(
                await session.connection(), task.id, claimed_at=task.poll_claimed_at
            )

    @staticmethod
    def _last_chance(task: PollClaim, now: datetime) -> bool:
        """Past any link's lifetime: one last question, then no more waiting."""
        return now - task.created_at > LINK_LIFETIME

    async def _apply_answers(
        self, answers: Sequence[tuple[PollClaim, Snapshot]], *, together: bool = True
    ) -> None:
        """Apply the provider's answers and release the leases, one transaction for all
        (the usual ones decided `together`, on PostgreSQL).

        Should the batch fail as a whole, each answer is tried in a transaction of its own,
        one by one through the state machine; one that fails alone is logged and left to
        its lease (never raised: the answers still to come in the same batch must not be
        dropped).
        """
        if not answers:
            return
        # Rows are locked in id order, as a callback batch locks them
        # (`repository.CONFIRM_BATCH_SQL`): in any other order the two can deadlock.
        answers = sorted(answers, key=lambda answer: answer[0].id)
        usual = _usual(answers) if together else []
        now = utcnow()
        batched = False  # whether the batch's own statements were tried
        try:
            async with self._factory() as session, session.begin():
                db = await session.connection()
                batched = bool(usual) and db.dialect.name == "postgresql"
                decided = await self._apply_together(db, answers, usual, now) if batched else {}
                applied: list[tuple[Applied, bool]] = []
                for task, snapshot in answers:
                    # A task's decision answers its first answer only: any later one about
                    # it is `_apply_one`'s, which finds the task as the first left it.
                    mine = decided.pop(task.id, None)
                    applied.append(mine or await self._apply_one(db, task, snapshot, now))
        except Exception:
            if len(answers) == 1 and not batched:
                # Tried one by one already: its lease runs out and it is due again (asked
                # later, not lost).
                log.exception("poll_apply_failed", task_id=answers[0][0].id)
                return
            log.warning("poll_batch_failed", tasks=len(answers), exc_info=True)
            for answer in answers:
                await self._apply_answers([answer], together=False)
            return
        for (task, snapshot), (result, waiting) in zip(answers, applied, strict=True):
            if result.outcome is Outcome.APPLIED:
                log_transition(result.state)  # told once committed: a failed batch's are not
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

    async def _apply_together(
        self,
        db: AsyncConnection,
        answers: Sequence[tuple[PollClaim, Snapshot]],
        usual: Sequence[tuple[PollClaim, Snapshot]],
        now: datetime,
    ) -> dict[str, tuple[Applied, bool]]:
        """PostgreSQL: the `usual` answers (see `_usual`) decided and written together,
        as a batch of callbacks is; by task id. Any other answer, or one that leaves its
        task active, is `_apply_one`'s."""
        if len(usual) < len(answers):
            # Every answer's row, in id order, before anything is written (see above);
            # when all are usual, the batch's own lock takes them all in that order.
            await repository.lock_states(db, [task.id for task, _ in answers])
        decided = await snapshot_batches.apply_snapshots(
            db, [(task.id, snapshot) for task, snapshot in usual], now=now
        )
        together: dict[str, tuple[Applied, bool]] = {}
        notes = []
        for task, snapshot in usual:
            decision = decided[task.id]
            if decision.outcome is None or decision.state is None:
                continue
            if not decision.state.status.terminal:
                continue  # nothing was written for it: its lease is `_apply_one`'s
            together[task.id] = (Applied(decision.outcome, decision.state), False)
            detail = _answered(task, snapshot, decision.outcome)
            notes.append(activity.row(task.id, activity.Kind.QUERY, "ok", at=now, detail=detail))
        await activity.note_many(db, notes)
        return together

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
        detail = _answered(task, snapshot, applied.outcome)
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
        # Not while a callback's news is newer than this poll: ask once more first;
        # nor once a later poll has claimed the task (it decides).
        condition = and_(
            repository.no_confirmation_asked_since(task.poll_claimed_at),
            repository.claimed_by(task.poll_claimed_at),
        )
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
