"""Submitting tasks: billed once, whatever the caller retries or the network loses.

Submit runs its own short transactions instead of the request's: the task must
be committed before the provider is called (its callback may arrive before
the submit call returns), and the result recorded after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from app import activity, metrics, repository
from app.callback_urls import callback_url
from app.config import Settings
from app.db import SessionFactory, statement_commits, transaction
from app.errors import BadGateway, Conflict, ServiceUnavailable, Unprocessable
from app.events.bus import Notice, queue_after_commit
from app.ids import ulid
from app.models import Task, TaskStatus, utcnow
from app.repository import TaskState
from app.schemas import Snapshot, TaskCreate
from app.services import events, submit_answer
from app.services.snapshots import Applied, Outcome, UpstreamIdTaken, adopting, apply_snapshot
from app.upstream import (
    StarMagicClient,
    UpstreamError,
    UpstreamOutcomeUnknown,
    UpstreamRejected,
    UpstreamUnavailable,
)
from app.webhooks import repository as webhook_repository

log = structlog.get_logger(__name__)

# A key whose first request is younger than this and still submitting is in flight.
IN_FLIGHT_WINDOW = timedelta(seconds=60)
# Retry-After told to a caller when the provider was unavailable: ours, or the
# provider's own when longer, up to an hour.
RETRY_AFTER_SECONDS = 5
MAX_RETRY_AFTER_SECONDS = 3600


def new_task_id() -> str:
    """`tsk_` and a ULID: sortable by creation time, unguessable in its tail."""
    return "tsk_" + ulid()


def fingerprint(request: TaskCreate) -> str:
    """A stable hash of what was asked, to tell a replay from a different request."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _webhook_events(request: TaskCreate) -> str | None:
    """The stored `,a,b,` form of what the task's webhook_url hears (None: no URL)."""
    if request.webhook_url is None:
        return None
    chosen = request.webhook_events or [kind.value for kind in events.SETTLED_EVENTS]
    return webhook_repository.type_list(list(dict.fromkeys(chosen)))


@dataclass(frozen=True)
class SubmitResult:
    task: Task
    replayed: bool
    # What the request's log line tells of an accepted submission (empty: a replay).
    log_fields: dict[str, object] = field(default_factory=dict)


def first_poll_delay(settings: Settings, estimated_time: int | None) -> timedelta:
    """Look first near the provider's estimate, never later than the quiet limit."""
    after = settings.reconcile_after_seconds
    if estimated_time is not None and estimated_time > 0:
        after = min(after, float(estimated_time))
    return timedelta(seconds=after)


async def _replay(
    factory: SessionFactory, owner: str, key: str, digest: str, now: datetime
) -> SubmitResult:
    async with factory() as session:
        record = await repository.get_idempotency_record(session, owner, key)
        task = await repository.get_task(session, record.task_id) if record else None
    if record is None or task is None:
        raise Conflict("this Idempotency-Key is being claimed; retry", code="idempotency_in_flight")
    if record.request_sha256 != digest:
        raise Unprocessable(
            "Idempotency-Key was already used with a different request body",
            code="idempotency_key_reused",
        )
    in_flight = (
        task.status == TaskStatus.SUBMITTING
        and not task.submit_outcome_unknown
        and now - task.created_at < IN_FLIGHT_WINDOW
    )
    if in_flight:
        raise Conflict(
            "a request with this Idempotency-Key is still in flight",
            code="idempotency_in_flight",
            headers={"Retry-After": "1"},
        )
    return SubmitResult(task, replayed=True)


async def submit_task(
    engine: AsyncEngine,
    factory: SessionFactory,
    client: StarMagicClient,
    settings: Settings,
    request: TaskCreate,
    *,
    owner: str,
    idempotency_key: str | None,
    check_webhook_url: Callable[[str], Awaitable[object]] | None = None,
) -> SubmitResult:
    """Record the task, send it to StarMagic once, and record what came back.

    `check_webhook_url` refuses a webhook_url the destination policy forbids (before
    anything is recorded).
    """
    if request.model not in settings.allowed_models:
        allowed = ", ".join(settings.allowed_models)
        reason = f"model {request.model!r} is not enabled here (enabled: {allowed})"
        raise Unprocessable(f"model: {reason}", details=[{"field": "model", "reason": reason}])
    now = utcnow()
    # Only a key's request is ever compared with another.
    digest = fingerprint(request) if idempotency_key is not None else ""
    if request.webhook_url is not None and check_webhook_url is not None:
        # A key already used answers as a replay (or a reuse) whatever the URL is now;
        # only a new request has its destination checked (which resolves its host).
        if idempotency_key is not None:
            async with factory() as session:
                used = await repository.get_idempotency_record(session, owner, idempotency_key)
            if used is not None:
                return await _replay(factory, owner, idempotency_key, digest, now)
        await check_webhook_url(request.webhook_url)
    task = Task(
        id=new_task_id(),
        status=TaskStatus.SUBMITTING.value,
        prompt=request.prompt,
        model=request.model,
        size=request.size,
        quality=request.quality,
        resolution=request.resolution,
        n=request.n,
        image_urls=request.image_urls,
        mask_url=request.mask_url,
        meta=request.metadata,
        owner=owner,
        webhook_url=request.webhook_url,
        webhook_events=_webhook_events(request),
        created_at=now,
        updated_at=now,
        # A crash before the outcome is recorded leaves the task here; the
        # reconciler settles it once no callback can be expected any more.
        next_poll_at=now + timedelta(seconds=settings.submit_unknown_after_seconds),
    )
    key = None
    if idempotency_key is not None:
        key = {
            "owner": owner,
            "key": idempotency_key,
            "request_sha256": digest,
            "task_id": task.id,
            "created_at": now,
        }
    created = events.event_row(events.EventType.TASK_CREATED, task, [], now=now)
    try:
        async with statement_commits(engine) as db:
            if not await repository.insert_submission(db, repository.task_row(task), created, key):
                raise _KeyTaken  # nothing of this request may stay (SQLite rolls back)
            queue_after_commit(db, Notice(created["type"], task.id, owner))
    except _KeyTaken:
        assert idempotency_key is not None
        replay = await _replay(factory, owner, idempotency_key, digest, now)
        metrics.SUBMISSIONS.labels(outcome="replayed").inc()
        return replay

    body = request.upstream_body()
    body["callback_url"] = callback_url(settings.public_base_url, task.id, settings.signing_secret)
    if logging.getLogger(__name__).isEnabledFor(logging.DEBUG):  # processing costs a line
        log.debug("submit_started", task_id=task.id)  # submit_accepted or a failure follows
    try:
        snapshot = await client.submit(body)
    except UpstreamOutcomeUnknown as exc:
        metrics.SUBMISSIONS.labels(outcome="unknown").inc()
        await _mark_unknown(factory, task.id, exc)
        async with factory() as session:
            current = await repository.get_task(session, task.id)
        assert current is not None
        return SubmitResult(current, replayed=False)
    except UpstreamError as exc:
        outcome = "refused" if isinstance(exc, UpstreamRejected) else "unavailable"
        metrics.SUBMISSIONS.labels(outcome=outcome).inc()
        # Refused or unreachable: the provider created nothing. A key that only
        # met "try again later" is released, so the caller's retry submits anew.
        release = idempotency_key if isinstance(exc, UpstreamUnavailable) else None
        await _mark_failed(factory, task.id, exc, owner=owner, release_key=release)
        raise _caller_error(task.id, exc) from exc

    applied = await _record_answer(engine, settings, task, snapshot)
    current = applied.task
    if current is None:
        # A callback got there first: read the task as it now is.
        async with factory() as session:
            current = await repository.get_task(session, task.id)
    assert current is not None  # tasks are never deleted
    metrics.SUBMISSIONS.labels(outcome="accepted").inc()
    # The status this answer moved the task to (none when a callback got there first).
    moved = {"task_status": applied.state.status.value} if applied.changed else {}
    log_fields: dict[str, object] = {
        "task_id": task.id,
        "upstream_task_id": current.upstream_task_id,
        "outcome": applied.outcome.value,
        **moved,
    }
    return SubmitResult(current, replayed=False, log_fields=log_fields)


class _KeyTaken(Exception):
    """The Idempotency-Key was already bound: this request's rows must not commit."""


async def _record_answer(
    engine: AsyncEngine, settings: Settings, task: Task, snapshot: Snapshot
) -> Applied:
    """Apply the provider's answer to the task we inserted, and note it in the activity.

    The common answer (pending, to a task still submitting) is one guarded UPDATE
    built from the state machine's own rules (`transition`, `owns_upstream_id`);
    anything else, or a task a callback moved since, goes through `apply_snapshot`.
    On the common path `task` (as inserted) is brought up to date and returned.
    """
    task_id = task.id
    now = utcnow()
    poll_after = first_poll_delay(settings, snapshot.estimated_time)
    answer = f"StarMagic task {snapshot.upstream_id}, {snapshot.status.value}"
    note = activity.row(task_id, activity.Kind.SUBMIT, "accepted", at=now, detail=answer)
    async with statement_commits(engine) as db:
        if snapshot.status is TaskStatus.PENDING and snapshot.upstream_id:
            # Submitting to pending tells no event and queues no image.
            shape = submit_answer.Shape.of(snapshot)
            inserted = TaskState(task_id, TaskStatus(task.status), task.progress, None)
            try:
                async with adopting(db, inserted, snapshot.upstream_id):
                    moved = await repository.accept_submission(
                        db,
                        task,
                        shape,
                        lambda: submit_answer.template(shape),
                        submit_answer.params(task_id, snapshot, now=now, poll_after=poll_after),
                        note,
                    )
            except UpstreamIdTaken:
                # Another task took the id after the guard looked (its write had not
                # committed): nothing was written, and the state machine below now
                # sees the id taken, as if that task had been first.
                moved = False
            if moved:
                status = TaskStatus(task.status)
                state = TaskState(task.id, status, task.progress, task.upstream_task_id)
                return Applied(Outcome.APPLIED, state, task)
        # Nothing written yet: the state machine reads the row and decides.
        async with transaction(db):
            applied = await apply_snapshot(db, task_id, snapshot, now=now, poll_after=poll_after)
            await activity.note(
                db, task_id, activity.Kind.SUBMIT, "accepted", at=now, detail=answer
            )
    return applied


def _caller_error(task_id: str, exc: UpstreamError) -> BadGateway | ServiceUnavailable:
    details = [{"task_id": task_id, "provider_code": exc.code, "provider_status": exc.status_code}]
    if isinstance(exc, UpstreamRejected):
        return BadGateway(f"StarMagic refused the task: {exc.message}", details=details)
    retry = None
    if isinstance(exc, UpstreamUnavailable):
        # The provider's own wait when it named a longer one than ours (bounded).
        wait = min(max(RETRY_AFTER_SECONDS, exc.retry_after or 0), MAX_RETRY_AFTER_SECONDS)
        retry = {"Retry-After": str(math.ceil(wait))}
    return ServiceUnavailable(
        f"StarMagic is unavailable: {exc.message}", details=details, headers=retry
    )


async def _mark_failed(
    factory: SessionFactory,
    task_id: str,
    exc: UpstreamError,
    *,
    owner: str,
    release_key: str | None,
) -> None:
    log.warning("submit_failed", task_id=task_id, code=exc.code, reason=exc.message)
    now = utcnow()
    async with factory() as session, session.begin():
        db = await session.connection()
        failed = await repository.update_returning(
            db,
            task_id,
            col(Task.status) == TaskStatus.SUBMITTING.value,
            {
                "status": TaskStatus.FAILED.value,
                "error_code": exc.code[:64],
                "error_message": exc.message,
                "updated_at": now,
                "completed_at": now,
                "next_poll_at": None,
            },
        )
        if failed is not None:
            await events.record(db, events.EventType.TASK_FAILED, failed, [], now=now)
        outcome = "refused" if isinstance(exc, UpstreamRejected) else "unavailable"
        detail = f"{exc.code}: {exc.message}"
        await activity.note(db, task_id, activity.Kind.SUBMIT, outcome, at=now, detail=detail)
        # A task a callback already moved exists at the provider: its key stays bound.
        if release_key is not None and failed is not None:
            await repository.release_idempotency_key(session, owner, release_key, task_id)


async def _mark_unknown(factory: SessionFactory, task_id: str, exc: UpstreamError) -> None:
    # Never re-sent: a callback (which carries our task id) or the reconciler's
    # deadline will settle it.
    log.warning("submit_outcome_unknown", task_id=task_id, reason=exc.message)
    now = utcnow()
    async with factory() as session, session.begin():
        await repository.update_task_where(
            session,
            task_id,
            col(Task.status) == TaskStatus.SUBMITTING.value,
            {"submit_outcome_unknown": True, "updated_at": now},
        )
        await activity.note(
            await session.connection(),
            task_id,
            activity.Kind.SUBMIT,
            "unknown",
            at=now,
            detail=f"no answer known ({exc.message}); never sent again",
        )
